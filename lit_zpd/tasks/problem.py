"""The unit every source produces and every method consumes."""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from lit_zpd.tasks.privileged import PrivilegedContext
from lit_zpd.tasks.verifier import BoxedVerifier, Verifier

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Problem:
    """A prompt with a verifiable answer.

    Args:
        problem_id: Unique within its source; stable across runs (used by replay buffers and
            per-problem pass-rate estimates).
        prompt: Text the student is conditioned on.
        answer: The final answer, normalised as the verifier compares it.
        reference: Optional worked solution ending in ``\\boxed{answer}``.
        skill: Skill tag (knowledge point); ``"default"`` when the data set has none.
        difficulty: Graded difficulty level within the skill, starting at 1.
    """

    problem_id: str
    prompt: str
    answer: str
    reference: str | None = None
    skill: str = "default"
    difficulty: int = 1


class ProblemSource(ABC):
    """Where problems come from, and the verifier that scores responses to them. Subclasses are
    selected in YAML with ``class_path``; they set ``self.verifier`` (``boxed`` by default)."""

    verifier: Verifier = BoxedVerifier()

    @abstractmethod
    def problems(self, split: Split) -> list[Problem]:
        """All problems of one split, in a deterministic order."""

    def privileged_context(self) -> PrivilegedContext:
        """How a privileged self-teacher reads this source's reference solutions (template and
        segments); OPSD's template over blank-line paragraphs unless a source knows better."""
        return PrivilegedContext()

    def rewrite_solution(self, problem: Problem, response: str) -> str | None:
        """IOA's Adapter rewrite: a correct ``response`` (a teacher's solution of ``problem``)
        in this source's standard solution template with every step explicit; ``None`` when the
        response is wrong. Sources without a template raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no standard solution template to rewrite into")

    def skill_graph(self) -> dict[str, list[str]]:
        """Prerequisites of every skill, ``{skill: [prerequisite, ...]}``; a DAG."""
        skills = sorted({p.skill for p in self.problems("train")})
        return {s: [] for s in skills}

    def skills(self) -> list[str]:
        return list(self.skill_graph())


def hash_split(key: str, seed: int, validation_fraction: float, test_fraction: float) -> Split:
    """The split of a problem keyed by ``key``: a hash, so it never depends on what else is drawn."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def cap_per_skill(problems: list[Problem], cap: int) -> list[Problem]:
    """Keep up to ``cap`` problems per skill, taken round-robin over its difficulty levels."""
    by_level: dict[str, dict[int, list[Problem]]] = {}
    for p in problems:
        by_level.setdefault(p.skill, {}).setdefault(p.difficulty, []).append(p)
    kept: list[Problem] = []
    for levels in by_level.values():
        rows = itertools.zip_longest(*(levels[d] for d in sorted(levels)))
        kept.extend([p for row in rows for p in row if p is not None][:cap])
    return kept
