"""IOA's Organizer: which skills and difficulty levels a student may be taught now.

IOA (seed 001) delivers the deficient knowledge points found by the Knowledge Identifier
(:func:`~lit_zpd.tasks.skills.deficiencies`) through a progressive curriculum: a skill opens only
when every prerequisite is mastered (Bloom's mastery learning, ``min P_S / P_T >= mastery_ratio``
over the prerequisite's levels), and within a skill new material arrives in difficulty increments
no larger than ``max_difficulty_step`` (the zone of proximal development).

Difficulty scale: IOA's is normalised to [0, 1]. A source's graded levels are mapped onto it by
their rank along the curriculum: skills in topological order, levels ascending within a skill,
spaced evenly from 0 to 1 (:func:`normalised_difficulty`). The embedded curriculum has 12
(skill, level) cells, so neighbouring levels are 1/11 = 0.09 apart and the paper's 0.15 step
lets a skill rise one level at a time.

:class:`Organizer` is plain data and pure logic: it is told the mastery ratio ``P_S / P_T`` of every
(skill, level) cell after each probe, and answers with the frontier (the cells to draw from) and
the review pool (mastered skills, drawn from a share of the time against forgetting). A deficient
skill mastered on the way that falls below mastery again goes back to the frontier (remediation).
Skills that were never deficient count as mastered prerequisites; a re-run of the Identifier is
what finds one that has become deficient.

The ``CurriculumScheduler`` callback that probes the student and the teacher, runs the
Identifier and the Organizer, and restricts the problem sampler to the frontier is not built yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lit_zpd.tasks.skills import Deficiency, SkillGraph

Cell = tuple[str, int]  # (skill, difficulty level)


def normalised_difficulty(graph: SkillGraph, levels: Mapping[str, Iterable[int]]) -> dict[Cell, float]:
    """Each (skill, level) cell's place on IOA's [0, 1] difficulty scale (see the module doc)."""
    cells = [(skill, level) for skill in graph.order() for level in sorted(set(levels.get(skill, ())))]
    if len(cells) == 1:
        return {cells[0]: 0.0}
    return {cell: i / (len(cells) - 1) for i, cell in enumerate(cells)}


@dataclass
class Organizer:
    """The curriculum's state and its gating rules (see the module doc).

    Args:
        graph: The skill graph.
        difficulty: Every (skill, level) cell's normalised difficulty.
        mastery_ratio: A cell is mastered when ``P_S / P_T`` reaches it.
        max_difficulty_step: The largest rise of a skill's difficulty ceiling at once.
        active_share: Share of the deficient skills taught at the same time (IOA: 20-30% per
            round); at least one.
    """

    graph: SkillGraph
    difficulty: dict[Cell, float]
    mastery_ratio: float = 0.9
    max_difficulty_step: float = 0.15
    active_share: float = 0.25
    deficient: list[str] = field(default_factory=list)  # most severe first
    ceiling: dict[str, float] = field(default_factory=dict)  # per deficient skill
    mastered: set[str] = field(default_factory=set)
    ratios: dict[Cell, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.mastery_ratio <= 1:
            raise ValueError(f"mastery_ratio must be in (0, 1], got {self.mastery_ratio}")
        if not 0 < self.max_difficulty_step <= 1:
            raise ValueError(f"max_difficulty_step must be in (0, 1], got {self.max_difficulty_step}")
        if not 0 < self.active_share <= 1:
            raise ValueError(f"active_share must be in (0, 1], got {self.active_share}")

    def levels(self, skill: str) -> list[int]:
        return sorted(level for s, level in self.difficulty if s == skill)

    def start(self, found: list[Deficiency]) -> None:
        """Begin with the Identifier's deficiencies: every other skill counts as mastered, each
        deficient skill's ceiling is its easiest level."""
        self.deficient = [d.skill for d in found]
        self.mastered = set(self.graph.skills) - set(self.deficient)
        self.ceiling = {s: self.difficulty[(s, self.levels(s)[0])] for s in self.deficient}

    def cell_mastered(self, cell: Cell) -> bool:
        return self.ratios.get(cell, 0.0) >= self.mastery_ratio

    def skill_mastered(self, skill: str) -> bool:
        """Every level of the skill mastered (the min over its cells)."""
        return all(self.cell_mastered((skill, level)) for level in self.levels(skill))

    def is_open(self, skill: str) -> bool:
        """Every prerequisite mastered."""
        return all(p in self.mastered for p in self.graph.prerequisites[skill])

    def active(self) -> list[str]:
        """The skills taught now: open, not mastered, deficient, most severe first, at most
        ``active_share`` of the deficient skills."""
        limit = max(1, math.ceil(self.active_share * len(self.deficient)))
        candidates = [s for s in self.deficient if s not in self.mastered and self.is_open(s)]
        return candidates[:limit]

    def frontier(self) -> set[Cell]:
        """The cells to draw new problems from: the active skills' levels up to their ceiling."""
        return {(s, level) for s in self.active() for level in self.levels(s) if self.difficulty[(s, level)] <= self.ceiling[s] + 1e-9}

    def review(self) -> set[Cell]:
        """The cells of mastered skills, drawn from for review."""
        return {cell for cell in self.difficulty if cell[0] in self.mastered}

    def update(self, ratios: Mapping[Cell, float]) -> dict[str, list[str]]:
        """Take new mastery ratios ``P_S / P_T`` per cell; raise ceilings, master skills, send a
        mastered skill that fell below mastery back (remediation). Returns what changed."""
        self.ratios.update(ratios)
        events: dict[str, list[str]] = {"raised": [], "mastered": [], "remediated": []}
        for skill in self.deficient:
            if skill in self.mastered:
                if not self.skill_mastered(skill):
                    self.mastered.discard(skill)
                    events["remediated"].append(skill)
                continue
            if skill not in self.active():
                continue
            if self.skill_mastered(skill):
                self.mastered.add(skill)
                events["mastered"].append(skill)
                continue
            below = [lv for lv in self.levels(skill) if self.difficulty[(skill, lv)] <= self.ceiling[skill] + 1e-9]
            above = [lv for lv in self.levels(skill) if lv not in below]
            if above and all(self.cell_mastered((skill, lv)) for lv in below):
                target = self.difficulty[(skill, above[0])]
                self.ceiling[skill] = min(target, self.ceiling[skill] + self.max_difficulty_step)
                events["raised"].append(skill)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "deficient": list(self.deficient),
            "ceiling": dict(self.ceiling),
            "mastered": sorted(self.mastered),
            "ratios": [[skill, level, ratio] for (skill, level), ratio in sorted(self.ratios.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.deficient = list(state["deficient"])
        self.ceiling = {k: float(v) for k, v in state["ceiling"].items()}
        self.mastered = set(state["mastered"])
        self.ratios = {(skill, int(level)): float(ratio) for skill, level, ratio in state["ratios"]}
