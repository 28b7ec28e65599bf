"""Problem sources and the verifier that scores responses against their answers."""

from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.dataset_source import DatasetSource
from lit_zpd.tasks.privileged import COMPACT_TEMPLATE, OPSD_TEMPLATE, PrivilegedContext
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
    "COMPACT_TEMPLATE", "OPSD_TEMPLATE", "ArithmeticCurriculum", "BoxedVerifier", "DatasetSource", "GSM8KVerifier",
    "LastNumberVerifier", "MathVerifyVerifier", "PrivilegedContext", "Problem", "ProblemSource", "Verifier", "extract_boxed", "score_response",
]
