"""ZPPO's reformulated prompts for hard problems: BCQ and NCQ (pure functions).

- BCQ (binary candidate-included question): the problem, an instruction that two candidate
  responses follow, one correct and one wrong, usable as references, then the two responses (one
  correct teacher response, one wrong student response) as anonymised candidate blocks in random
  order.
- NCQ (negative candidate-included question): the problem, "the following answers are all wrong:
  a1, ..., aK" (the parsed final answers, deduplicated), then every wrong student response as its
  own candidate block.

The paper first has the teacher compress each candidate into a short summary (<= 5 lines / 512
tokens). Here a :class:`CandidateCompressor` does it; the default :class:`TruncateCandidates`
truncates without a model, keeping the final answer line. A teacher-summary compressor is a
subclass.

Example::

    text = build_bcq("12+34=?\\n", correct="...\\\\boxed{46}", wrong="...\\\\boxed{45}", correct_first=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lit_zpd.tasks.verifier import extract_boxed, normalize_answer

Extract = Callable[[str], str | None]


@dataclass(frozen=True)
class ReformulationTemplates:
    """Format strings of the reformulated prompts.

    Args:
        bcq: BCQ prompt; fields ``{problem}`` (the original prompt, trailing whitespace removed)
            and ``{candidates}`` (the two rendered candidate blocks).
        ncq: NCQ prompt; fields ``{problem}``, ``{wrong_answers}`` (``ncq_answers`` rendered, or
            empty when no final answer could be parsed) and ``{candidates}``.
        ncq_answers: The list of wrong final answers; field ``{answers}`` (comma separated).
        candidate: One anonymised candidate block; fields ``{index}`` (1, 2, ...) and ``{text}``.
    """

    bcq: str = (
        "{problem}\n"
        "Two candidate responses follow. One is correct and one is wrong; "
        "you may use them as references.\n"
        "{candidates}"
        "Now solve the problem.\n"
    )
    ncq: str = "{problem}\n{wrong_answers}{candidates}Now solve the problem.\n"
    ncq_answers: str = "The following answers are all wrong: {answers}.\n"
    candidate: str = "Candidate {index}:\n{text}\n"

    def __post_init__(self) -> None:
        required = {
            "bcq": ("{problem}", "{candidates}"),
            "ncq": ("{problem}", "{wrong_answers}", "{candidates}"),
            "ncq_answers": ("{answers}",),
            "candidate": ("{text}",),
        }
        for name, fields in required.items():
            for needed in fields:
                if needed not in getattr(self, name):
                    raise ValueError(f"templates.{name} must contain {needed!r}")


class CandidateCompressor:
    """Shortens a candidate response before it goes into a prompt; the base class keeps it whole."""

    def __call__(self, text: str) -> str:
        return text


class TruncateCandidates(CandidateCompressor):
    """Keep at most ``max_lines`` lines and ``max_chars`` characters, the final line always kept.

    The final line usually carries the final answer (``\\boxed{...}``), the one thing a reference
    must not lose; the lines cut from the middle are replaced by nothing (no marker, so the
    tokenizer needs no extra characters).

    Args:
        max_lines: Line cap, ``None`` for no cap (paper: 5).
        max_chars: Character cap, ``None`` for no cap (paper: 512 tokens).

    Example::

        TruncateCandidates(max_lines=3)("a\\nb\\nc\\nd")  # "a\\nb\\nd"
    """

    def __init__(self, max_lines: int | None = 5, max_chars: int | None = 512) -> None:
        if max_lines is not None and max_lines < 1:
            raise ValueError(f"compressor.max_lines must be >= 1 or null, got {max_lines}")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"compressor.max_chars must be >= 1 or null, got {max_chars}")
        self.max_lines = max_lines
        self.max_chars = max_chars

    def __call__(self, text: str) -> str:
        lines = text.strip("\n").split("\n")
        if self.max_lines is not None and len(lines) > self.max_lines:
            lines = lines[: self.max_lines - 1] + lines[-1:]
        text = "\n".join(lines)
        if self.max_chars is None or len(text) <= self.max_chars:
            return text
        last = lines[-1][-self.max_chars :]
        head = "\n".join(lines[:-1])[: max(0, self.max_chars - len(last) - 1)]
        return f"{head}\n{last}" if head else last


def wrong_answers(texts: list[str], extract: Extract = extract_boxed) -> list[str]:
    """The final answers of ``texts`` (read by ``extract``, the verifier's), in order, deduplicated
    after normalisation; responses without one contribute nothing."""
    seen: set[str] = set()
    out = []
    for text in texts:
        answer = extract(text)
        if answer is None or normalize_answer(answer) in seen:
            continue
        seen.add(normalize_answer(answer))
        out.append(answer.strip())
    return out


def render_candidates(texts: list[str], template: str, compress: CandidateCompressor | None = None) -> str:
    """The candidate blocks, numbered from 1, each compressed first."""
    compress = compress or CandidateCompressor()
    return "".join(template.format(index=i, text=compress(text)) for i, text in enumerate(texts, start=1))


def build_bcq(
    problem: str,
    correct: str,
    wrong: str,
    correct_first: bool,
    templates: ReformulationTemplates = ReformulationTemplates(),
    compress: CandidateCompressor | None = None,
) -> str:
    """The BCQ prompt for ``problem`` with one correct and one wrong response, unlabelled.

    Args:
        problem: The original prompt.
        correct: A correct (teacher) response.
        wrong: A wrong (student) response.
        correct_first: Order of the two blocks; the caller draws it at random.
        templates: Format strings.
        compress: Applied to each candidate.
    """
    pair = [correct, wrong] if correct_first else [wrong, correct]
    candidates = render_candidates(pair, templates.candidate, compress)
    return templates.bcq.format(problem=problem.rstrip(), candidates=candidates)


def build_ncq(
    problem: str,
    wrong: list[str],
    templates: ReformulationTemplates = ReformulationTemplates(),
    compress: CandidateCompressor | None = None,
    extract: Extract = extract_boxed,
) -> str:
    """The NCQ prompt for ``problem`` from its wrong responses (each its own candidate block).

    Args:
        problem: The original prompt.
        wrong: The wrong (student) responses, at least one.
        templates: Format strings.
        compress: Applied to each candidate (the listed final answers come from the full text).
        extract: Reads a response's final answer (the problem source's verifier's ``extract``).
    """
    if not wrong:
        raise ValueError("build_ncq needs at least one wrong response")
    answers = wrong_answers(wrong, extract)
    listed = templates.ncq_answers.format(answers=", ".join(answers)) if answers else ""
    candidates = render_candidates(wrong, templates.candidate, compress)
    return templates.ncq.format(problem=problem.rstrip(), wrong_answers=listed, candidates=candidates)


def augmentation_order(
    pass_rates: list[float], bcq_ready: list[bool], ncq_ready: list[bool], cap: int
) -> list[tuple[int, str]]:
    """ZPPO's augmentation cap: which reformulations to build, in order.

    Keep the ``cap`` hardest problems (lowest pass rate; ties in input order), walk them in
    ascending pass rate appending BCQ then NCQ while fewer than ``cap`` prompts are chosen, so
    with one slot left BCQ wins.

    Args:
        pass_rates: Pass rate of each hard problem.
        bcq_ready: A BCQ can be built (a correct teacher response and a wrong student one exist).
        ncq_ready: An NCQ can be built (a wrong student response exists).
        cap: Maximum number of reformulated prompts.

    Returns:
        ``(problem position, "bcq" | "ncq")`` pairs, at most ``cap``.
    """
    hardest = sorted(range(len(pass_rates)), key=lambda i: pass_rates[i])[: max(cap, 0)]
    chosen: list[tuple[int, str]] = []
    for i in hardest:
        for kind, ready in (("bcq", bcq_ready[i]), ("ncq", ncq_ready[i])):
            if ready and len(chosen) < cap:
                chosen.append((i, kind))
    return chosen
