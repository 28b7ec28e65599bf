"""IOA (seed 001) as a callback: identify what the student lacks, organise it into a gated
curriculum, and restrict the problems each step draws to the student's frontier.

Per rollout, in the pipeline's phases (:mod:`lit_zpd.rollout.plan`):

1. draw: every ``reprobe_every_n_steps`` optimizer steps (and before the first rollout) the
   student and the teacher are **probed**: greedy accuracy on up to ``probe_size`` held-out
   problems of every (skill, level) cell of ``probe_split``. The teacher is probed once (it is
   frozen); the student's probe tokens count in ``rollout/student_tokens_total``. The
   **Knowledge Identifier** (:func:`~lit_zpd.tasks.skills.deficiencies`) then ranks the skills
   whose relative gap ``(P_T - P_S) / P_T`` exceeds ``gap_threshold`` by
   ``severity = alpha * gap + (1 - alpha) * connectivity``, and the **Organizer** takes the
   mastery ratio ``P_S / P_T`` of every cell. The draw is restricted to the frontier's cells plus
   the review pool's, weighted so that review problems are ``review_share`` of the draw.
   Problems a replay buffer adds keep to the same restriction (:meth:`DrawRequest.allows`).
2. plan: the state is logged under ``curriculum/``. After a probe, the first training step draws
   the heat map (rank 0, TensorBoard).

The Organizer (:class:`Organizer`): a skill opens only when every prerequisite is mastered
(Bloom's mastery learning, ``min P_S / P_T >= mastery_ratio`` over the prerequisite's levels), and
within a skill new material arrives in difficulty increments no larger than
``max_difficulty_step`` (the zone of proximal development). At most ``active_share`` of the
deficient skills are taught at once (IOA: 20-30% per round), most severe first. A deficient skill
mastered on the way that falls below mastery again goes back to the frontier (remediation);
skills never found deficient count as mastered prerequisites, and each re-run of the Identifier
adds those that have become deficient. When no deficient skill is left to teach, the draw is not
restricted.

Difficulty scale: IOA's is normalised to [0, 1]. A source's graded levels are mapped onto it by
their rank along the curriculum: skills in topological order, levels ascending within a skill,
spaced evenly from 0 to 1 (:func:`normalised_difficulty`). The embedded curriculum has 12
(skill, level) cells, so neighbouring levels are 1/11 = 0.09 apart and the paper's 0.15 step
lets a skill rise one level at a time.

The **Adapter**, IOA's third stage, fits the teacher's material to the student:
:class:`~lit_zpd.callbacks.adapter.TeacherAdapter`, a separate callback.

Deliberate simplifications: mastery is measured by greedy accuracy on a fixed probe set, and the
probes read ``probe_split`` (the test split by default) so that the validation accuracy the run
reports is not the one the curriculum steered by.

Logs per rollout ``curriculum/mastery/<skill>`` (min over the skill's levels of ``P_S / P_T``),
``curriculum/student_accuracy/<skill>``, ``curriculum/frontier_cells``,
``curriculum/active_skills``, ``curriculum/deficient_skills``, ``curriculum/mastered_skills``
(deficient skills mastered since), ``curriculum/probes`` and the Organizer's events at the last
probe (``curriculum/raised``, ``curriculum/mastered``, ``curriculum/remediated``,
``curriculum/identified``); after each probe, the image ``curriculum/mastery_map`` (every cell's
``P_S / P_T`` over the probes, the frontier outlined).

State: the Organizer, the teacher's probe accuracy (with the probe settings it was measured
with: a run resumed with other ones probes the teacher again), the step of the last probe and
the history of probes, as plain data. Probes are gathered over the ranks, so every rank holds the same state.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_zpd.rollout.batch import EvalBatch
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.plan import DrawRequest, RolloutHook, RolloutPlan
from lit_zpd.tasks.problem import SPLITS, Problem, Split
from lit_zpd.tasks.skills import Deficiency, SkillGraph, deficiencies

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
        gating: Mastery gating (IOA's Organizer). ``False`` is the ablation without it: every
            deficient skill not yet mastered is taught at once, all its levels, whatever its
            prerequisites.
    """

    graph: SkillGraph
    difficulty: dict[Cell, float]
    mastery_ratio: float = 0.9
    max_difficulty_step: float = 0.15
    active_share: float = 0.25
    gating: bool = True
    identified: int = 0  # runs of the Identifier so far
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

    def identify(self, found: list[Deficiency]) -> list[str]:
        """Take a run of the Identifier. The first run starts the curriculum: every skill not found
        deficient counts as mastered, the deficient ones are taught most severe first. Later runs
        add the skills newly found deficient after them (they leave the mastered set); a skill
        found before keeps its place, ceiling and mastery, so a stage is never left before it is
        mastered. A deficient skill starts at its easiest level. Returns the skills added."""
        if not self.identified:
            self.mastered = set(self.graph.skills)
        self.identified += 1
        new = [d.skill for d in found if d.skill not in self.deficient]
        self.deficient += new
        for skill in new:
            self.mastered.discard(skill)
            self.ceiling[skill] = self.difficulty[(skill, self.levels(skill)[0])]
        return new

    def cell_mastered(self, cell: Cell) -> bool:
        return self.ratios.get(cell, 0.0) >= self.mastery_ratio

    def skill_mastered(self, skill: str) -> bool:
        """Every level of the skill mastered (the min over its cells)."""
        return all(self.cell_mastered((skill, level)) for level in self.levels(skill))

    def is_open(self, skill: str) -> bool:
        """Every prerequisite mastered (always, without gating)."""
        return not self.gating or all(p in self.mastered for p in self.graph.prerequisites[skill])

    def active(self) -> list[str]:
        """The skills taught now: open, not mastered, deficient, most severe first, at most
        ``active_share`` of the deficient skills (all of them without gating)."""
        candidates = [s for s in self.deficient if s not in self.mastered and self.is_open(s)]
        if not self.gating:
            return candidates
        return candidates[: max(1, math.ceil(self.active_share * len(self.deficient)))]

    def frontier(self) -> set[Cell]:
        """The cells to draw new problems from: the active skills' levels up to their ceiling
        (every level without gating)."""
        return {
            (s, level) for s in self.active() for level in self.levels(s)
            if not self.gating or self.difficulty[(s, level)] <= self.ceiling[s] + 1e-9
        }

    def review(self) -> set[Cell]:
        """The cells of mastered skills, drawn from for review."""
        return {cell for cell in self.difficulty if cell[0] in self.mastered}

    def update(self, ratios: Mapping[Cell, float]) -> dict[str, list[str]]:
        """Take new mastery ratios ``P_S / P_T`` per cell; raise ceilings, master skills, send a
        mastered skill that fell below mastery back (remediation). Returns what changed."""
        self.ratios.update(ratios)
        events: dict[str, list[str]] = {"raised": [], "mastered": [], "remediated": []}
        taught = set(self.active())  # before this probe's changes: a skill unlocked now waits for the next
        for skill in self.deficient:
            if skill in self.mastered:
                if not self.skill_mastered(skill):
                    self.mastered.discard(skill)
                    events["remediated"].append(skill)
                continue
            if skill not in taught:
                continue
            if self.skill_mastered(skill):
                self.mastered.add(skill)
                self.ceiling[skill] = self.difficulty[(skill, self.levels(skill)[-1])]  # every level, should it return
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
            "identified": self.identified,
            "deficient": list(self.deficient),
            "ceiling": dict(self.ceiling),
            "mastered": sorted(self.mastered),
            "ratios": [[skill, level, ratio] for (skill, level), ratio in sorted(self.ratios.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.identified = int(state.get("identified", 1))
        self.deficient = list(state["deficient"])
        self.ceiling = {k: float(v) for k, v in state["ceiling"].items()}
        self.mastered = set(state["mastered"])
        self.ratios = {(skill, int(level)): float(ratio) for skill, level, ratio in state["ratios"]}


def cell_of(problem: Problem) -> Cell:
    return (problem.skill, problem.difficulty)


class CurriculumScheduler(Callback, RolloutHook):
    """IOA's Identifier and Organizer: probe, find deficiencies, draw from the frontier (see the
    module doc).

    Args:
        gap_threshold: A skill is deficient when ``(P_T - P_S) / P_T`` exceeds it (paper: 0.3).
        alpha: Weight of the gap against connectivity in the severity, in [0, 1].
        mastery_ratio: A cell is mastered when ``P_S / P_T`` reaches it (paper: 0.9).
        max_difficulty_step: Largest rise of a skill's difficulty ceiling, on the normalised scale
            (paper: 0.15).
        active_share: Share of the deficient skills taught at once (paper: 20-30%).
        review_share: Share of each draw taken from mastered skills, against forgetting.
        probe_size: Held-out problems per (skill, level) cell in a probe.
        probe_split: The split probed; not the one the run's accuracy report reads.
        reprobe_every_n_steps: Optimizer steps between probes of the student.
        gating: Mastery gating; ``False`` is the ablation that teaches every deficient skill at
            once, all levels, ignoring prerequisites.

    Example::

        trainer = Trainer(callbacks=[CurriculumScheduler(reprobe_every_n_steps=25)])
    """

    def __init__(
        self,
        gap_threshold: float = 0.3,
        alpha: float = 0.5,
        mastery_ratio: float = 0.9,
        max_difficulty_step: float = 0.15,
        active_share: float = 0.25,
        review_share: float = 0.1,
        probe_size: int = 16,
        probe_split: Split = "test",
        reprobe_every_n_steps: int = 25,
        gating: bool = True,
    ) -> None:
        name = type(self).__name__
        for key, value in (("gap_threshold", gap_threshold), ("alpha", alpha), ("review_share", review_share)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}.{key} must be in [0, 1], got {value}")
        if review_share == 1.0:
            raise ValueError(f"{name}.review_share must be below 1 (the frontier needs a share), got 1.0")
        if probe_size < 1:
            raise ValueError(f"{name}.probe_size must be >= 1, got {probe_size}")
        if probe_split not in SPLITS:
            raise ValueError(f"{name}.probe_split must be one of {', '.join(SPLITS)}, got {probe_split!r}")
        if reprobe_every_n_steps < 1:
            raise ValueError(f"{name}.reprobe_every_n_steps must be >= 1, got {reprobe_every_n_steps}")
        try:
            Organizer(SkillGraph({}), {}, mastery_ratio, max_difficulty_step, active_share)  # checks the rest
        except ValueError as error:
            raise ValueError(f"{name}.{error}") from None
        self.gap_threshold = gap_threshold
        self.alpha = alpha
        self.mastery_ratio = mastery_ratio
        self.max_difficulty_step = max_difficulty_step
        self.active_share = active_share
        self.review_share = review_share
        self.probe_size = probe_size
        self.probe_split: Split = probe_split
        self.reprobe_every_n_steps = reprobe_every_n_steps
        self.gating = gating
        self.organizer: Organizer | None = None
        self.teacher_accuracy: dict[Cell, float] | None = None
        self.last_probe_step: int | None = None
        self.history: list[dict[str, Any]] = []  # one entry per probe, plain data
        self._probe_set: list[Problem] = []
        self._train_cells: Counter[Cell] = Counter()
        self._loaded: dict[str, Any] | None = None
        self._drawn_maps = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(gap_threshold=self.gap_threshold, mastery_ratio=self.mastery_ratio, gating=self.gating)

    # ----------------------------------------------------------------------------- Lightning

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        teacher = getattr(pl_module, "teacher", None)
        if teacher is None or teacher is getattr(pl_module, "student", None):
            raise ValueError(
                f"{type(self).__name__} measures the student against a teacher: set model.teacher to a model "
                "(not self_live, which is the student itself)"
            )
        context = getattr(trainer.datamodule, "context", None)
        if context is not None:
            self._build(context)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if len(self.history) == self._drawn_maps or not trainer.is_global_zero:
            return
        self._drawn_maps = len(self.history)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            from lit_zpd.figures import mastery_map  # matplotlib is loaded only by runs that draw

            tensorboard.experiment.add_figure(
                "curriculum/mastery_map", mastery_map(self.history, self.cells(), self.mastery_ratio), trainer.global_step
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            pl_module.print(self.summary_table())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "organizer": self.organizer.state_dict() if self.organizer else None,
            "teacher_accuracy": None if self.teacher_accuracy is None else [[s, lv, a] for (s, lv), a in sorted(self.teacher_accuracy.items())],
            "probe": [self.probe_split, self.probe_size],
            "last_probe_step": self.last_probe_step,
            "history": self.history,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rows = state_dict.get("teacher_accuracy")
        self.teacher_accuracy = None if rows is None else {(s, int(lv)): float(a) for s, lv, a in rows}
        if state_dict.get("probe") != [self.probe_split, self.probe_size]:
            self.teacher_accuracy = None  # another probe set: the teacher is probed again on it
        self.last_probe_step = state_dict.get("last_probe_step")
        self.history = list(state_dict.get("history", []))
        self._drawn_maps = len(self.history)
        self._loaded = state_dict.get("organizer")
        if self.organizer is not None and self._loaded is not None:
            self.organizer.load_state_dict(self._loaded)

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def on_draw(self, ctx: RolloutContext, draw: DrawRequest) -> None:
        organizer = self._build(ctx)
        if self.last_probe_step is None or ctx.policy_version - self.last_probe_step >= self.reprobe_every_n_steps:
            self.probe(ctx)
        frontier = organizer.frontier()
        if not frontier:
            return  # nothing deficient left to teach: draw from everything
        review = organizer.review() if self.review_share > 0 else set()
        allowed = frontier | review
        draw.restrict(type(self).__name__, lambda p: cell_of(p) in allowed)
        if review:
            weight_frontier = (1 - self.review_share) / sum(self._train_cells[c] for c in frontier)
            weight_review = self.review_share / sum(self._train_cells[c] for c in review)
            draw.weight(type(self).__name__, lambda p: weight_frontier if cell_of(p) in frontier else weight_review)

    @override
    def on_plan(self, ctx: RolloutContext, plan: RolloutPlan) -> None:
        organizer = self._build(ctx)
        last = self.history[-1]
        plan.metrics |= {f"curriculum/mastery/{skill}": value for skill, value in self.skill_mastery().items()}
        plan.metrics |= {f"curriculum/student_accuracy/{skill}": value for skill, value in last["student"].items()}
        plan.metrics |= {
            "curriculum/frontier_cells": float(len(organizer.frontier())),
            "curriculum/active_skills": float(len(organizer.active())),
            "curriculum/deficient_skills": float(len(organizer.deficient)),
            "curriculum/mastered_skills": float(sum(s in organizer.mastered for s in organizer.deficient)),
            "curriculum/probes": float(len(self.history)),
        }
        plan.metrics |= {f"curriculum/{event}": float(len(skills)) for event, skills in last["events"].items()}

    # ----------------------------------------------------------------------------- IOA

    def probe(self, ctx: RolloutContext) -> None:
        """Measure the student (and, once, the teacher), re-run the Identifier, update the Organizer."""
        organizer = self._build(ctx)
        if self.teacher_accuracy is None:
            self.teacher_accuracy = self._accuracy(ctx.evaluate(ctx.teacher, self._probe_set, samples=0))
        student = self._accuracy(ctx.evaluate(ctx.student, self._probe_set, samples=0, budget=True))
        p_student, p_teacher = self._per_skill(student), self._per_skill(self.teacher_accuracy)
        found = deficiencies(p_student, p_teacher, organizer.graph, self.gap_threshold, self.alpha)
        identified = organizer.identify(found)
        ratios = {cell: student[cell] / t if t > 0 else 1.0 for cell, t in self.teacher_accuracy.items()}
        events = organizer.update(ratios) | {"identified": identified}
        self.last_probe_step = ctx.policy_version
        self.history.append({
            "step": ctx.policy_version,
            "ratios": [[s, lv, r] for (s, lv), r in sorted(ratios.items())],
            "frontier": sorted([s, lv] for s, lv in organizer.frontier()),
            "student": p_student,
            "teacher": p_teacher,
            "deficient": [d.skill for d in found],
            "events": events,
        })

    def cells(self) -> list[Cell]:
        """Every (skill, level) cell in curriculum order."""
        assert self.organizer is not None, "built at setup or at the first draw"
        return sorted(self.organizer.difficulty, key=self.organizer.difficulty.__getitem__)

    def skill_mastery(self) -> dict[str, float]:
        """Per skill, the min over its levels of the last probe's ``P_S / P_T``."""
        out: dict[str, float] = {}
        for skill, _, ratio in self.history[-1]["ratios"] if self.history else []:
            out[skill] = min(out.get(skill, math.inf), ratio)
        return out

    def summary(self) -> dict[str, float]:
        """Run-level counts: probes, skills found deficient at the first probe and since, deficient
        skills mastered, frontier cells now."""
        if self.organizer is None or not self.history:
            return {}
        org = self.organizer
        return {
            "probes": float(len(self.history)),
            "deficient_at_first_probe": float(len(self.history[0]["deficient"])),
            "deficient_since": float(len(org.deficient)),
            "mastered": float(sum(s in org.mastered for s in org.deficient)),
            "frontier_cells": float(len(org.frontier())),
        }

    def summary_table(self) -> str:
        """Per skill: accuracy of the student at the first and the last probe, the teacher's, the
        mastery ratio, and whether it was deficient, is mastered, or is being taught."""
        assert self.organizer is not None and self.history
        first, last, org = self.history[0], self.history[-1], self.organizer
        mastery = self.skill_mastery()
        lines = [f"curriculum after {len(self.history)} probes (step {last['step']})",
                 f"{'skill':<14} {'P_S first':>9} {'P_S last':>9} {'P_T':>6} {'mastery':>8}  status"]
        for skill in org.graph.order():
            status = "taught" if skill in org.active() else "mastered" if skill in org.mastered else "waiting"
            if skill not in org.deficient:
                status = "not deficient"
            lines.append(
                f"{skill:<14} {first['student'][skill]:>9.3f} {last['student'][skill]:>9.3f} "
                f"{last['teacher'][skill]:>6.3f} {mastery[skill]:>8.3f}  {status}"
            )
        return "\n".join(lines)

    def _build(self, ctx: RolloutContext) -> Organizer:
        """The Organizer, the probe set and the training cells, from the source (once)."""
        if self.organizer is not None:
            return self.organizer
        graph = SkillGraph(ctx.source.skill_graph(), where="data.source skill graph")
        train = ctx.problems("train")
        self._train_cells = Counter(cell_of(p) for p in train)
        unknown = sorted({s for s, _ in self._train_cells} - set(graph.skills))
        if unknown:
            raise ValueError(f"{type(self).__name__}: training skill {unknown[0]!r} is not in data.source's skill graph")
        untaught = sorted(set(graph.skills) - {s for s, _ in self._train_cells})
        if untaught:
            raise ValueError(
                f"{type(self).__name__}: skill {untaught[0]!r} of data.source's skill graph has no training problem to "
                "teach it with (or none whose prompt fits data.prompt.max_tokens); drop it from the prerequisite map "
                "(data.source.skill_graph) or add training rows"
            )
        levels: dict[str, set[int]] = {}
        for skill, level in self._train_cells:
            levels.setdefault(skill, set()).add(level)
        per_cell: dict[Cell, list[Problem]] = {}
        for problem in ctx.problems(self.probe_split):
            per_cell.setdefault(cell_of(problem), []).append(problem)
        missing = sorted(c for c in self._train_cells if not per_cell.get(c))
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the {self.probe_split} split has no problem of skill {missing[0][0]!r} at "
                f"difficulty {missing[0][1]} to probe (whose prompt fits data.prompt.max_tokens); set probe_split to a "
                "split that covers every training cell"
            )
        self._probe_set = [p for cell in sorted(self._train_cells) for p in per_cell[cell][: self.probe_size]]
        self.organizer = Organizer(
            graph, normalised_difficulty(graph, levels), self.mastery_ratio, self.max_difficulty_step,
            self.active_share, self.gating,
        )
        if self._loaded is not None:
            self.organizer.load_state_dict(self._loaded)
        return self.organizer

    def _accuracy(self, results: EvalBatch) -> dict[Cell, float]:
        """Greedy accuracy per cell of the probe set (results in the probe set's order)."""
        hits: dict[Cell, list[float]] = {}
        for problem, correct in zip(self._probe_set, results.greedy_correct.tolist()):
            hits.setdefault(cell_of(problem), []).append(float(correct))
        return {cell: sum(v) / len(v) for cell, v in hits.items()}

    def _per_skill(self, accuracy: Mapping[Cell, float]) -> dict[str, float]:
        """Accuracy per skill over its probe problems (cells weighted by their probe size)."""
        sizes = Counter(cell_of(p) for p in self._probe_set)
        totals: dict[str, list[float]] = {}
        for cell, acc in accuracy.items():
            row = totals.setdefault(cell[0], [0.0, 0.0])
            row[0] += acc * sizes[cell]
            row[1] += sizes[cell]
        return {skill: hit / n for skill, (hit, n) in totals.items()}
