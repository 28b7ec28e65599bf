"""Problem sources and the verifier that scores responses against their answers."""

from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.dataset_source import DatasetSource
from lit_zpd.tasks.problem import Problem, ProblemSource
from lit_zpd.tasks.verifier import extract_boxed, score_response

__all__ = ["ArithmeticCurriculum", "DatasetSource", "Problem", "ProblemSource", "extract_boxed", "score_response"]
