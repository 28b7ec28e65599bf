"""Problem sources and the verifier that scores responses against their answers."""

from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.dataset_source import DatasetSource
from lit_zpd.tasks.problem import Problem, ProblemSource
from lit_zpd.tasks.verifier import (
    BoxedVerifier,
    GSM8KVerifier,
    LastNumberVerifier,
    MathVerifyVerifier,
    Verifier,
    extract_boxed,
    score_response,
)

__all__ = [
    "ArithmeticCurriculum", "BoxedVerifier", "DatasetSource", "GSM8KVerifier", "LastNumberVerifier",
    "MathVerifyVerifier", "Problem", "ProblemSource", "Verifier", "extract_boxed", "score_response",
]
