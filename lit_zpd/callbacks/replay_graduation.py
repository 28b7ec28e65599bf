"""ZPPO: replay hard problems until they graduate, with BCQ/NCQ reformulations (seed 000).

Per rollout, in the pipeline's phases (:mod:`lit_zpd.rollout.plan`):

1. plan: add ``round(replay_ratio * |new|)`` problems per rank (rounded half up; ``|new|`` is
   the rank's drawn problems), drawn uniformly without replacement from the buffer, skipping
   problems any rank drew new this rollout and problems the draw phase's restrictions exclude
   (a curriculum's frontier: they stay buffered until it admits them again), as plain prompts
   marked ``replayed``. The draw comes
   from a stream seeded by ``(seed, rollout index)``, the same on every rank; rank ``k`` takes every
   ``W``-th problem from ``k``, so ranks replay disjoint problems.
2. augment (student rollouts only: the reformulations are built from the student's wrong
   rollouts): the hard problems of this rank's batch (plain pass rate below
   ``graduation_threshold``, new and replayed alike) are sorted by pass rate; the
   ``round(augment_ratio * |new|)`` hardest get ``teacher_samples`` fresh teacher responses
   (re-sampled at every visit) and are walked in ascending pass rate adding a BCQ (when a teacher
   response is correct) then an NCQ prompt until that cap is reached. They are sampled from the
   student in the same batch as their own groups (kind ``bcq`` / ``ncq``).
3. observe: the plain groups of every rank (never BCQ/NCQ) update the buffer: a problem outside
   the buffer with a pass rate below the threshold is admitted (the oldest entry is evicted
   beyond ``capacity``); a problem in the buffer counts a visit and graduates (is removed) when
   its pass rate reaches the threshold. On teacher or reference batches (a distillation baseline
   with replay, or a teacher-first KLSchedule stage) the pass rate is the student's, measured by
   the pipeline (``data.pass_rate``), and replay works the same; only BCQ/NCQ are skipped there.

The buffer holds problem ids, never responses; its state is plain data, identical on every rank.
Per-rollout counters go to ``replay/`` once per rollout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import GroupSummary, PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.tasks.reformulate import (
    CandidateCompressor,
    ReformulationTemplates,
    TruncateCandidates,
    augmentation_order,
    build_bcq,
    build_ncq,
)


@dataclass
class _Entry:
    admitted_at: int  # rollout index of admission
    visits: int = 0  # plain rollouts of the problem since admission


class ReplayGraduationCallback(Callback, RolloutHook):
    """ZPPO's prompt replay buffer and BCQ/NCQ reformulated prompts for hard problems.

    Args:
        capacity: Most problems the buffer holds; the oldest admitted is evicted beyond it
            (paper: 10000).
        graduation_threshold: A problem is hard while its plain pass rate is below this; a
            buffered problem graduates when its pass rate reaches it (paper: 0.5).
        replay_ratio: Replayed problems per new problem, ``rho_replay`` (paper: 0.25).
        augment_ratio: BCQ + NCQ prompts per new problem, ``rho_aug`` (paper: 0.25); 0 turns the
            reformulations off.
        teacher_samples: ``G_T``, teacher responses per augmented hard problem (paper: 4).
        teacher_sampling: Sampling of those responses; ``data.teacher_sampling`` if ``None``.
        bcq: Build BCQ prompts (needs ``model.teacher``).
        ncq: Build NCQ prompts.
        ncq_max_candidates: Wrong responses shown in an NCQ (the first ones); ``None`` shows
            all, as the paper does. Small models with short contexts need a cap.
        templates: Format strings of the BCQ and NCQ prompts.
        compressor: Shortens each candidate response; ``None`` keeps it whole.
        seed: Seed of the replay draws and of the BCQ candidate order.

    Example::

        trainer = Trainer(callbacks=[ReplayGraduationCallback(capacity=10_000, replay_ratio=0.25)])
    """

    def __init__(
        self,
        capacity: int = 10_000,
        graduation_threshold: float = 0.5,
        replay_ratio: float = 0.25,
        augment_ratio: float = 0.25,
        teacher_samples: int = 4,
        teacher_sampling: SamplingConfig | None = None,
        bcq: bool = True,
        ncq: bool = True,
        ncq_max_candidates: int | None = None,
        templates: ReformulationTemplates = ReformulationTemplates(),
        compressor: CandidateCompressor | None = TruncateCandidates(),
        seed: int = 0,
    ) -> None:
        name = type(self).__name__
        if capacity < 1:
            raise ValueError(f"{name}.capacity must be >= 1, got {capacity}")
        if not 0.0 < graduation_threshold <= 1.0:
            raise ValueError(f"{name}.graduation_threshold must be in (0, 1], got {graduation_threshold}")
        for key, value in (("replay_ratio", replay_ratio), ("augment_ratio", augment_ratio)):
            if value < 0:
                raise ValueError(f"{name}.{key} must be >= 0, got {value}")
        if teacher_samples < 1:
            raise ValueError(f"{name}.teacher_samples must be >= 1, got {teacher_samples}")
        if ncq_max_candidates is not None and ncq_max_candidates < 1:
            raise ValueError(f"{name}.ncq_max_candidates must be >= 1 or null, got {ncq_max_candidates}")
        self.capacity = capacity
        self.graduation_threshold = graduation_threshold
        self.replay_ratio = replay_ratio
        self.augment_ratio = augment_ratio
        self.teacher_samples = teacher_samples
        self.teacher_sampling = teacher_sampling
        self.bcq = bcq
        self.ncq = ncq
        self.ncq_max_candidates = ncq_max_candidates
        self.templates = templates
        self.compressor = compressor
        self.seed = seed
        self.buffer: OrderedDict[str, _Entry] = OrderedDict()
        self.admissions = 0
        self.graduations = 0
        self.evictions = 0
        self.graduation_visits = 0  # visits summed over graduated problems
        self._teacher_solved = 0  # this rank's hard problems with a correct teacher response, this rollout

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            capacity=self.capacity,
            graduation_threshold=self.graduation_threshold,
            replay_ratio=self.replay_ratio,
            augment_ratio=self.augment_ratio,
        )

    # ----------------------------------------------------------------------------- Lightning

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.bcq and self.augment_ratio > 0 and getattr(pl_module, "teacher", None) is None:
            raise ValueError(f"{type(self).__name__}.bcq needs a teacher: set model.teacher or bcq: false")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": [
                {"problem_id": pid, "admitted_at": e.admitted_at, "visits": e.visits} for pid, e in self.buffer.items()
            ],
            "admissions": self.admissions,
            "graduations": self.graduations,
            "evictions": self.evictions,
            "graduation_visits": self.graduation_visits,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer = OrderedDict(
            (str(row["problem_id"]), _Entry(int(row["admitted_at"]), int(row.get("visits", 0))))
            for row in state_dict.get("buffer", [])
        )
        self.admissions = int(state_dict.get("admissions", 0))
        self.graduations = int(state_dict.get("graduations", 0))
        self.evictions = int(state_dict.get("evictions", 0))
        self.graduation_visits = int(state_dict.get("graduation_visits", 0))

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def needs_pass_rates(self) -> bool:
        return True  # admission and graduation on teacher or reference batches

    @override
    def on_plan(self, ctx: RolloutContext, plan: RolloutPlan) -> None:
        planned = plan.drawn_everywhere
        available = [pid for pid in self.buffer if pid not in planned and plan.draw.allows(ctx.problem(pid))]
        per_rank = _round_half_up(self.replay_ratio * plan.drawn)
        count = min(per_rank * ctx.world_size, len(available))
        replayed = ctx.rng("replay", self.seed, plan.rollout_index).sample(available, count)[ctx.rank :: ctx.world_size]
        plan.prompts.extend(PromptSpec(ctx.problem(pid), replayed=True) for pid in replayed)
        plan.metrics["replay/step_replayed"] = float(count)

    @override
    def on_augment(self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[PromptSpec]:
        cap = _round_half_up(self.augment_ratio * plan.drawn)
        if not plan.on_policy or cap == 0 or not (self.bcq or self.ncq):
            return []
        hard = [g for g in groups if g.spec.kind == "plain" and g.pass_rate < self.graduation_threshold]
        hard = sorted(hard, key=lambda g: g.pass_rate)[:cap]
        teacher = self._teacher_responses(ctx, hard) if self.bcq else [[] for _ in hard]
        wrong = [[t for t, r in zip(g.texts, g.rewards) if r <= 0] for g in hard]
        order = augmentation_order(
            [g.pass_rate for g in hard],
            [self.bcq and bool(c) and bool(w) for c, w in zip(teacher, wrong)],
            [self.ncq and bool(w) for w in wrong],
            cap,
        )
        self._teacher_solved = sum(bool(c) for c in teacher)
        rng = ctx.rng("bcq", self.seed, plan.rollout_index, per_rank=True)
        specs = []
        for i, kind in order:
            problem, text = hard[i].spec.problem, hard[i].spec.student_prompt
            if kind == "bcq":
                correct, wrong_one = rng.choice(teacher[i]), rng.choice(wrong[i])
                prompt = build_bcq(text, correct, wrong_one, rng.random() < 0.5, self.templates, self.compressor)
            else:
                prompt = build_ncq(
                    text, wrong[i][: self.ncq_max_candidates], self.templates, self.compressor, ctx.extract_answer
                )
            specs.append(PromptSpec(problem, kind=kind, student_prompt=prompt, replayed=hard[i].spec.replayed))
        return specs

    @override
    def on_observe(self, ctx: RolloutContext, plan: RolloutPlan, summaries: list[GroupSummary]) -> None:
        # Counted over every rank's groups (the teacher's successes are gathered: they are per rank).
        counts = {
            "hard": sum(s.kind == "plain" and s.on_policy and s.pass_rate < self.graduation_threshold for s in summaries),
            "bcq": sum(s.kind == "bcq" for s in summaries),
            "ncq": sum(s.kind == "ncq" for s in summaries),
            "teacher_solved": sum(ctx.gather(self._teacher_solved)),
            "admitted": 0, "graduated": 0, "evicted": 0,
        }
        self._teacher_solved = 0
        for s in summaries:
            if s.kind != "plain":
                continue
            pass_rate = s.pass_rate if s.on_policy else ctx.pass_rates.get(s.problem_id)
            if pass_rate is None:
                continue
            for event in self.observe(s.problem_id, pass_rate, plan.rollout_index):
                counts[event] += 1
        plan.metrics |= {f"replay/step_{k}": float(v) for k, v in counts.items()}
        plan.metrics |= {f"replay/{k}": v for k, v in self.summary().items()}
        if self.buffer:
            ages = [plan.rollout_index - e.admitted_at for e in self.buffer.values()]
            plan.histograms["replay/age"] = torch.tensor(ages, dtype=torch.float32)

    def summary(self) -> dict[str, float]:
        """The buffer's counters so far: size, admissions, graduations, evictions, mean visits."""
        out = {
            "buffer_size": float(len(self.buffer)),
            "admissions": float(self.admissions),
            "graduations": float(self.graduations),
            "evictions": float(self.evictions),
        }
        if self.graduations:
            out["mean_visits_before_graduation"] = self.graduation_visits / self.graduations
        return out

    # ----------------------------------------------------------------------------- buffer

    def observe(self, problem_id: str, pass_rate: float, rollout_index: int) -> list[str]:
        """Update the buffer with one plain pass rate; returns the events (admitted, graduated,
        evicted)."""
        entry = self.buffer.get(problem_id)
        if entry is not None:
            entry.visits += 1
            if pass_rate < self.graduation_threshold:
                return []
            del self.buffer[problem_id]
            self.graduations += 1
            self.graduation_visits += entry.visits
            return ["graduated"]
        if pass_rate >= self.graduation_threshold:
            return []
        self.buffer[problem_id] = _Entry(rollout_index)
        self.admissions += 1
        events = ["admitted"]
        while len(self.buffer) > self.capacity:
            self.buffer.popitem(last=False)
            self.evictions += 1
            events.append("evicted")
        return events

    def _teacher_responses(self, ctx: RolloutContext, groups: list[RolloutGroup]) -> list[list[str]]:
        """The correct ones among ``teacher_samples`` fresh teacher responses per group's problem."""
        if not groups:
            return []
        sampling: SamplingConfig = self.teacher_sampling or ctx.teacher_sampling
        prompts = [ctx.encode_prompt(g.spec.student_prompt) for g in groups]
        completions = ctx.engine_for(ctx.teacher).generate(prompts, self.teacher_samples, sampling)
        correct = []
        for group, samples in zip(groups, completions):
            texts = [ctx.decode(c.token_ids) for c in samples]
            correct.append([t for t in texts if ctx.reward(t, group.spec.problem.answer) > 0])
        return correct


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
