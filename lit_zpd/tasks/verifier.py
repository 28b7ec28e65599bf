"""Answer extraction and verifiers: a response scores 1 when its final answer matches.

A :class:`Verifier` reads the final answer out of a response and compares it with a problem's
answer. Every problem source carries one (``verifier`` in YAML, ``boxed`` by default), and the
rollout pipeline scores every response through it. Choices, by name or ``class_path``:

- ``boxed``: the last ``\\boxed{...}`` (:class:`BoxedVerifier`);
- ``gsm8k``: the text after the last ``####`` (:class:`GSM8KVerifier`);
- ``last_number``: the last number in the response (:class:`LastNumberVerifier`);
- ``math_verify``: the ``math-verify`` package, which compares LaTeX answers symbolically, so
  ``\\frac{1}{2}`` equals ``0.5`` (:class:`MathVerifyVerifier`; ``pip install lit-zpd[math]``).

The first three normalise both sides with :func:`normalize_answer` and compare strings.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

AnswerExtractor = Literal["boxed", "gsm8k", "last_number", "identity"]
VerifierName = Literal["boxed", "gsm8k", "last_number", "math_verify"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; ``None`` if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_gsm8k(text: str) -> str | None:
    """The part after the last ``####`` (GSM8K's answer field)."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip()


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "gsm8k": extract_gsm8k,
    "last_number": extract_last_number,
    "identity": lambda text: text,
}


def normalize_answer(answer: str) -> str:
    """Strip spaces, thousands separators and a trailing ``.0`` so ``1,000.0`` equals ``1000``."""
    text = answer.strip().replace(" ", "").replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    if re.fullmatch(r"-?0*\d+", text):
        digits = text.lstrip("-").lstrip("0") or "0"
        # Zero has no sign: a model writing -0 for 0 is right.
        text = ("-" if text.startswith("-") and digits != "0" else "") + digits
    return text


class Verifier(ABC):
    """Scores a response against a problem's answer. Subclass it for a task of your own and
    select it in YAML with ``class_path``.

    A verifier may raise on a strange response; the pipeline then scores that response 0 and
    counts it (``rollout/verifier_errors_total``) instead of stopping the run.
    """

    @abstractmethod
    def extract(self, response: str) -> str | None:
        """The final answer written in ``response``, or ``None`` when it has none."""

    def score(self, response: str, answer: str) -> float:
        """1.0 when the extracted answer equals ``answer`` after :func:`normalize_answer`, else 0.0."""
        predicted = self.extract(response)
        if predicted is None:
            return 0.0
        return float(normalize_answer(predicted) == normalize_answer(answer))


class BoxedVerifier(Verifier):
    """The last ``\\boxed{...}`` of the response, braces balanced (the default)."""

    def extract(self, response: str) -> str | None:
        return extract_boxed(response)


class GSM8KVerifier(Verifier):
    """The text after the response's last ``####``."""

    def extract(self, response: str) -> str | None:
        return extract_gsm8k(response)


class LastNumberVerifier(Verifier):
    """The last number in the response: reads models that answer in prose ("... so 42 apples")."""

    def extract(self, response: str) -> str | None:
        return extract_last_number(response)


class MathVerifyVerifier(Verifier):
    """Symbolic comparison with the ``math-verify`` package (``pip install lit-zpd[math]``).

    The answer is parsed as LaTeX or a plain expression and the response's last boxed or LaTeX
    answer is compared with it, so ``\\frac{1}{2}``, ``0.5`` and ``\\boxed{1/2}`` agree. math-verify
    bounds parsing time with ``SIGALRM``, which works in the main thread only; a call from another
    thread raises, and the pipeline counts that response as a verifier error.

    Args:
        float_rounding: Decimal places floats are rounded to before comparison.
    """

    def __init__(self, float_rounding: int = 6) -> None:
        try:
            import math_verify
        except ImportError as err:
            raise ImportError(
                "verifier: math_verify needs the math-verify package: pip install 'lit-zpd[math]'"
            ) from err
        if float_rounding < 0:
            raise ValueError(f"verifier.float_rounding must be >= 0, got {float_rounding}")
        self.float_rounding = float_rounding
        self._math_verify = math_verify

    def extract(self, response: str) -> str | None:
        parsed = self._math_verify.parse(response)
        return str(parsed[-1]) if parsed else None

    def score(self, response: str, answer: str) -> float:
        gold = self._math_verify.parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
        predicted = self._math_verify.parse(response)
        if not gold or not predicted:
            return 0.0
        return float(self._math_verify.verify(gold, predicted, float_rounding=self.float_rounding))


VERIFIERS: dict[str, type[Verifier]] = {
    "boxed": BoxedVerifier,
    "gsm8k": GSM8KVerifier,
    "last_number": LastNumberVerifier,
    "math_verify": MathVerifyVerifier,
}


def make_verifier(verifier: VerifierName | Verifier, key: str = "verifier") -> Verifier:
    """A verifier from its YAML value: a name of :data:`VERIFIERS` or an instance."""
    if isinstance(verifier, Verifier):
        return verifier
    if verifier not in VERIFIERS:
        raise ValueError(f"{key}: expected one of {', '.join(VERIFIERS)} or a Verifier class_path, got {verifier!r}")
    return VERIFIERS[verifier]()


def score_response(response: str, answer: str) -> float:
    """The default verifier's score: 1.0 if the last boxed answer equals ``answer`` after
    normalisation, else 0.0."""
    return BoxedVerifier().score(response, answer)
