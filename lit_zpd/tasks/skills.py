"""Knowledge points and their prerequisites: the skill graph of a problem source, and IOA's
measure of where a student is deficient relative to its teacher.

A :class:`SkillGraph` is a DAG ``{skill: [prerequisite, ...]}`` over the skills of a source
(:meth:`~lit_zpd.tasks.problem.ProblemSource.skill_graph`). It gives a deterministic topological
order (prerequisites first, ties by name), each skill's dependents (every skill that needs it,
directly or through others) and its connectivity, the share of the other skills that depend on it.

IOA's Knowledge Identifier (seed 001) compares the student's and the teacher's accuracy ``P_S`` and
``P_T`` per skill: the relative gap is ``(P_T - P_S) / P_T``; a skill is deficient when it exceeds
a threshold (the paper: 0.3), and deficiencies are ranked by
``severity = alpha * gap + (1 - alpha) * connectivity``: a gap on a skill many others build on
comes first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of prerequisites, first skill repeated at the end, or ``None`` for a DAG."""
    done: set[str] = set()

    def visit(skill: str, path: list[str]) -> list[str] | None:
        if skill in path:
            return path[path.index(skill) :] + [skill]
        if skill in done:
            return None
        for prereq in graph.get(skill, ()):
            cycle = visit(prereq, [*path, skill])
            if cycle:
                return cycle
        done.add(skill)
        return None

    for skill in graph:
        cycle = visit(skill, [])
        if cycle:
            return cycle
    return None


class SkillGraph:
    """A prerequisite DAG over skills (see the module doc).

    Args:
        prerequisites: ``{skill: [prerequisite, ...]}``; every prerequisite must be a key.
        where: What to name in errors (a YAML key or a file).

    Raises:
        ValueError: naming an unknown prerequisite, or the skills of a cycle.
    """

    def __init__(self, prerequisites: Mapping[str, Iterable[str]], where: str = "skill graph") -> None:
        graph = {skill: list(prereqs) for skill, prereqs in prerequisites.items()}
        for skill, prereqs in graph.items():
            unknown = [p for p in prereqs if p not in graph]
            if unknown:
                raise ValueError(
                    f"{where}: skill {skill!r} has the prerequisite {unknown[0]!r}, which is not a skill of the "
                    f"graph ({', '.join(sorted(graph))})"
                )
        cycle = find_cycle(graph)
        if cycle:
            raise ValueError(f"{where} has a cycle: {' -> '.join(cycle)}")
        self.prerequisites = graph

    @property
    def skills(self) -> list[str]:
        return list(self.prerequisites)

    def order(self) -> list[str]:
        """Every skill after its prerequisites; among skills free at the same time, by name."""
        placed: list[str] = []
        remaining = dict(self.prerequisites)
        while remaining:
            ready = sorted(s for s, prereqs in remaining.items() if all(p in placed for p in prereqs))
            placed.append(ready[0])  # a DAG always has one
            del remaining[ready[0]]
        return placed

    def dependents(self, skill: str) -> set[str]:
        """Every skill that needs ``skill``, directly or through other skills."""
        if skill not in self.prerequisites:
            raise KeyError(f"no skill {skill!r} in the graph")
        found: set[str] = set()
        frontier = {skill}
        while frontier:
            frontier = {s for s, prereqs in self.prerequisites.items() if frontier & set(prereqs)} - found
            found |= frontier
        return found

    def connectivity(self) -> dict[str, float]:
        """Per skill, the share of the other skills that depend on it, in [0, 1]."""
        others = max(len(self.prerequisites) - 1, 1)
        return {skill: len(self.dependents(skill)) / others for skill in self.prerequisites}


@dataclass(frozen=True)
class Deficiency:
    """A skill where the student trails the teacher.

    Args:
        skill: The skill.
        gap: ``(P_T - P_S) / P_T``.
        connectivity: Share of the other skills that depend on it.
        severity: ``alpha * gap + (1 - alpha) * connectivity``.
    """

    skill: str
    gap: float
    connectivity: float
    severity: float


def relative_gap(teacher: float, student: float) -> float:
    """``(P_T - P_S) / P_T``; 0 where the teacher scores 0 (nothing it could teach)."""
    return (teacher - student) / teacher if teacher > 0 else 0.0


def deficiencies(
    student: Mapping[str, float], teacher: Mapping[str, float], graph: SkillGraph, gap_threshold: float, alpha: float
) -> list[Deficiency]:
    """The deficient skills (gap above ``gap_threshold``), most severe first (ties by name).

    Args:
        student: ``P_S`` per skill of the graph.
        teacher: ``P_T`` per skill of the graph.
        graph: The skill graph.
        gap_threshold: A skill is deficient when its relative gap exceeds it.
        alpha: Weight of the gap against the connectivity in the severity, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    missing = [s for s in graph.skills if s not in student or s not in teacher]
    if missing:
        raise ValueError(f"no accuracy measured for skill {missing[0]!r}")
    connectivity = graph.connectivity()
    found = []
    for skill in graph.skills:
        gap = relative_gap(teacher[skill], student[skill])
        if gap > gap_threshold:
            found.append(Deficiency(skill, gap, connectivity[skill], alpha * gap + (1 - alpha) * connectivity[skill]))
    return sorted(found, key=lambda d: (-d.severity, d.skill))
