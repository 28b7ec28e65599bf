"""Answer extraction and scoring: a response scores 1 when its final answer matches."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

AnswerExtractor = Literal["boxed", "gsm8k", "last_number", "identity"]

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


def score_response(response: str, answer: str) -> float:
    """1.0 if the response's last boxed answer equals ``answer`` after normalisation, else 0.0."""
    predicted = extract_boxed(response)
    if predicted is None:
        return 0.0
    return float(normalize_answer(predicted) == normalize_answer(answer))
