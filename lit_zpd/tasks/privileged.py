"""The privileged context of a self-teacher: the problem with some of its reference solution.

On-policy self-distillation (OPSD) conditions the teacher, the student's own weights, on the
problem *and* its reference solution; the student sees the problem alone. ATESD reveals only part
of the reference: the reasoning is cut into segments ``r_1 .. r_m`` and at reveal ratio ``a`` the
teacher reads the first ``floor(a * m)`` of them, and always the final answer.

:class:`PrivilegedContext` turns a :class:`~lit_zpd.tasks.problem.Problem` and a reveal ratio into
the teacher's prompt text through a template with two fields, ``{problem}`` (the student's prompt)
and ``{solution}`` (the revealed segments, then the final answer line). The final answer line is
the reference's last line when it states the problem's answer (``\\boxed{85}``, ``#### 85`` or
``85`` alone); otherwise the whole reference is reasoning and ``answer_format`` filled with the
answer is appended. Segments are lines, blank-line separated
paragraphs or sentences of the rest.

Two templates ship: :data:`OPSD_TEMPLATE`, OPSD's public teacher context in substance, for models
that read English; :data:`COMPACT_TEMPLATE`, the one the embedded models are trained to read (see
:class:`~lit_zpd.tasks.arithmetic.ArithmeticCurriculum`'s ``context_copies``). A source names its
own default with ``privileged_template``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from lit_zpd.tasks.problem import Problem

SegmentBy = Literal["lines", "blank_lines", "sentences"]

OPSD_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n{problem}"
)
COMPACT_TEMPLATE = "ref:\n{solution}\n{problem}"
# Marks the id of a training problem copied with a partial reference already in its prompt
# (``ArithmeticCurriculum(context_copies=...)``); such copies are no plain problems to probe.
CONTEXT_COPY_MARK = "#context"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PrivilegedContext:
    """Builds a privileged teacher prompt from a problem and a reveal ratio (see the module doc).

    Args:
        template: Text with ``{problem}`` and ``{solution}``.
        segment_by: How the reference reasoning is cut: ``lines``, ``blank_lines`` (paragraphs)
            or ``sentences``.
        answer_format: The final answer line when the reference's last line does not hold the
            answer; ``{answer}`` is replaced.

    Example::

        context = PrivilegedContext(COMPACT_TEMPLATE, segment_by="lines")
        context.reveal(problem, 0.5)   # first half of the column lines, then \\boxed{answer}
    """

    template: str = OPSD_TEMPLATE
    segment_by: SegmentBy = "blank_lines"
    answer_format: str = "\\boxed{{{answer}}}"

    def __post_init__(self) -> None:
        for name in ("{problem}", "{solution}"):
            if name not in self.template:
                raise ValueError(f"the privileged template must contain {name}, got {self.template!r}")
        if self.segment_by not in get_args(SegmentBy):
            raise ValueError(f"segment_by must be one of {get_args(SegmentBy)}, got {self.segment_by!r}")
        if "{answer}" not in self.answer_format:
            raise ValueError(f"answer_format must contain {{answer}}, got {self.answer_format!r}")

    def split(self, problem: Problem) -> tuple[list[str], str]:
        """The reference's reasoning segments and its final answer line."""
        if not problem.reference:
            raise ValueError(f"problem {problem.problem_id!r} has no reference solution for a privileged teacher")
        body, _, last = problem.reference.rstrip().rpartition("\n")
        if body and _states_answer(last.strip(), problem.answer):
            return self.segments(body), last
        return self.segments(problem.reference.rstrip()), self.answer_format.format(answer=problem.answer)

    def segments(self, reasoning: str) -> list[str]:
        """``reasoning`` cut into segments, empty ones dropped."""
        if self.segment_by == "lines":
            parts = reasoning.split("\n")
        elif self.segment_by == "blank_lines":
            parts = re.split(r"\n\s*\n", reasoning)
        else:
            parts = _SENTENCE_END.split(reasoning)
        return [p.strip("\n") for p in parts if p.strip()]

    def join(self) -> str:
        """The separator placed between revealed segments."""
        return "\n\n" if self.segment_by == "blank_lines" else "\n" if self.segment_by == "lines" else " "

    def prompt(self, problem: Problem, shown: int, with_answer: bool = True) -> str:
        """The teacher prompt with the first ``shown`` segments and, if ``with_answer``, the
        final answer line."""
        return self._render(problem, *self.split(problem), shown, with_answer)

    def reveal(self, problem: Problem, ratio: float) -> str:
        """The teacher prompt at reveal ratio ``ratio`` in [0, 1]: ``floor(ratio * m)`` of the
        ``m`` reasoning segments, and the final answer."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"reveal ratio must be in [0, 1], got {ratio}")
        segments, answer = self.split(problem)
        # The small epsilon keeps a product such as 0.29 * 100 = 28.999... from losing a segment.
        return self._render(problem, segments, answer, math.floor(ratio * len(segments) + 1e-9), True)

    def _render(self, problem: Problem, segments: list[str], answer: str, shown: int, with_answer: bool) -> str:
        solution = self.join().join(segments[: max(0, shown)])
        if with_answer:
            solution = f"{solution}\n{answer}" if solution else answer
        return self.template.format(problem=problem.prompt, solution=solution)


def _states_answer(line: str, answer: str) -> bool:
    """Whether a reference's last line is its final-answer line: ``\\boxed{answer}``,
    ``#### answer`` or the answer alone."""
    return bool(answer) and (f"\\boxed{{{answer}}}" in line or line in (f"#### {answer}", answer))
