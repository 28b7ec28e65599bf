"""ZPPO: replay hard problems until they graduate, with BCQ/NCQ reformulations (seed 000).

Per rollout (design steps 1-4), on student (on-policy) batches only:

1. ``on_rollout_plan``: add ``round(replay_ratio * |new|)`` problems (rounded half up) drawn
   uniformly without replacement from the buffer, skipping problems already in the plan, as
   plain prompts. ``|new|`` is the number of plain prompts in the plan when this hook runs.
2. ``on_rollout_augment``: the hard problems of this batch (plain pass rate below
   ``graduation_threshold``, new and replayed alike) are sorted by pass rate; the
   ``round(augment_ratio * |new|)`` hardest get ``teacher_samples`` fresh teacher responses
   (re-sampled at every visit) and are walked in ascending pass rate adding a BCQ (when a teacher
   response is correct) then an NCQ prompt until that cap is reached. The data module samples
   them from the student in the same batch as their own groups (kind ``bcq`` / ``ncq``).
3. ``on_rollout_scored``: plain groups only (never BCQ/NCQ) update the buffer: a problem outside
   the buffer with a pass rate below the threshold is admitted (the oldest entry is evicted
   beyond ``capacity``); a problem in the buffer counts a visit and graduates (is removed) when
   its pass rate reaches the threshold.

The buffer holds problems, never responses. All randomness (replay draws, BCQ candidate order)
comes from one seeded :class:`random.Random` whose state is saved with the buffer; the teacher's
sampling noise is seeded by the data module per batch.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.tasks.problem import Problem
from lit_zpd.tasks.reformulate import (
    CandidateCompressor,
    ReformulationTemplates,
    TruncateCandidates,
    augmentation_order,
    build_bcq,
    build_ncq,
)
from lit_zpd.tasks.verifier import score_response


@dataclass
class _Entry:
    problem: Problem
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
        teacher_sampling: Sampling of those responses; the data module's ``teacher_sampling``
            if ``None``.
        bcq: Build BCQ prompts (needs ``model.teacher``).
        ncq: Build NCQ prompts.
        ncq_max_candidates: Wrong responses shown in an NCQ (the first ones); ``None`` shows
            all, as the paper does. Small models with short contexts need a cap.
        templates: Format strings of the BCQ and NCQ prompts.
        compressor: Shortens each candidate response; ``None`` keeps it whole.
        histogram_every_n_steps: Period of the buffer age histogram in TensorBoard.
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
        histogram_every_n_steps: int = 50,
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
        if histogram_every_n_steps < 1:
            raise ValueError(f"{name}.histogram_every_n_steps must be >= 1, got {histogram_every_n_steps}")
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
        self.histogram_every_n_steps = histogram_every_n_steps
        self.seed = seed
        self.buffer: OrderedDict[str, _Entry] = OrderedDict()
        self.admissions = 0
        self.graduations = 0
        self.evictions = 0
        self.graduation_visits = 0  # visits summed over graduated problems
        self.rollout_index = -1
        self._rng = random.Random(seed)
        self._new_problems = 0  # |new| of the rollout being built
        self._step_counts: dict[str, float] = {}  # this rollout's counts, logged at its first step

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
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        metrics = {f"replay/{k}": v for k, v in self.summary().items()}
        metrics |= {f"replay/step_{k}": v for k, v in self._step_counts.items()}
        self._step_counts = {}
        pl_module.log_dict(metrics, batch_size=1)
        logger = trainer.logger
        due = trainer.global_step % self.histogram_every_n_steps == 0
        if isinstance(logger, TensorBoardLogger) and self.buffer and due:
            ages = torch.tensor([self.rollout_index - e.admitted_at for e in self.buffer.values()], dtype=torch.float32)
            logger.experiment.add_histogram("replay/age", ages, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = self._rng.getstate()
        return {
            "buffer": [
                {"problem": asdict(e.problem), "admitted_at": e.admitted_at, "visits": e.visits}
                for e in self.buffer.values()
            ],
            "admissions": self.admissions,
            "graduations": self.graduations,
            "evictions": self.evictions,
            "graduation_visits": self.graduation_visits,
            "rollout_index": self.rollout_index,
            "rng_state": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer = OrderedDict()
        for row in state_dict.get("buffer", []):
            entry = _Entry(Problem(**row["problem"]), int(row["admitted_at"]), int(row.get("visits", 0)))
            self.buffer[entry.problem.problem_id] = entry
        self.admissions = int(state_dict.get("admissions", 0))
        self.graduations = int(state_dict.get("graduations", 0))
        self.evictions = int(state_dict.get("evictions", 0))
        self.graduation_visits = int(state_dict.get("graduation_visits", 0))
        self.rollout_index = int(state_dict.get("rollout_index", -1))
        rng = state_dict.get("rng_state")
        if rng is not None:
            self._rng.setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def on_rollout_plan(self, trainer: Any, plan: RolloutPlan) -> None:
        if plan.source != "student":
            return
        self.rollout_index = plan.index
        self._new_problems = sum(spec.kind == "plain" for spec in plan.prompts)
        planned = {spec.problem.problem_id for spec in plan.prompts}
        available = [e.problem for pid, e in self.buffer.items() if pid not in planned]
        count = min(_round_half_up(self.replay_ratio * self._new_problems), len(available))
        replayed = self._rng.sample(available, count)
        plan.prompts.extend(PromptSpec(problem) for problem in replayed)
        self._step_counts = {"replayed": float(count)}

    @override
    def on_rollout_augment(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[PromptSpec]:
        cap = _round_half_up(self.augment_ratio * self._new_problems)
        if plan.source != "student" or cap == 0 or not (self.bcq or self.ncq):
            return []
        hard = [g for g in groups if g.spec.kind == "plain" and g.pass_rate < self.graduation_threshold]
        hard = sorted(hard, key=lambda g: g.pass_rate)[:cap]
        teacher = self._teacher_responses(trainer, hard) if self.bcq else [[] for _ in hard]
        wrong = [[t for t, r in zip(g.texts, g.rewards) if r <= 0] for g in hard]
        order = augmentation_order(
            [g.pass_rate for g in hard],
            [self.bcq and bool(c) and bool(w) for c, w in zip(teacher, wrong)],
            [self.ncq and bool(w) for w in wrong],
            cap,
        )
        specs = []
        for i, kind in order:
            problem, text = hard[i].spec.problem, hard[i].spec.student_prompt or hard[i].spec.problem.prompt
            if kind == "bcq":
                correct, wrong_one = self._rng.choice(teacher[i]), self._rng.choice(wrong[i])
                prompt = build_bcq(text, correct, wrong_one, self._rng.random() < 0.5, self.templates, self.compressor)
            else:
                prompt = build_ncq(text, wrong[i][: self.ncq_max_candidates], self.templates, self.compressor)
            specs.append(PromptSpec(problem, kind=kind, student_prompt=prompt))
        self._step_counts |= {
            "hard": float(sum(g.spec.kind == "plain" and g.pass_rate < self.graduation_threshold for g in groups)),
            "bcq": float(sum(k == "bcq" for _, k in order)),
            "ncq": float(sum(k == "ncq" for _, k in order)),
            "teacher_solved": float(sum(bool(c) for c in teacher)),
        }
        return specs

    @override
    def on_rollout_scored(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> None:
        if plan.source != "student":
            return
        counts = {"admitted": 0, "graduated": 0, "evicted": 0}
        for group in groups:
            if group.spec.kind == "plain":
                for event in self.observe(group.spec.problem, group.pass_rate, plan.index):
                    counts[event] += 1
        self._step_counts |= {k: float(v) for k, v in counts.items()}

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

    def observe(self, problem: Problem, pass_rate: float, rollout_index: int) -> list[str]:
        """Update the buffer with one plain pass rate; returns the events (admitted, graduated,
        evicted)."""
        entry = self.buffer.get(problem.problem_id)
        if entry is not None:
            entry.visits += 1
            if pass_rate < self.graduation_threshold:
                return []
            del self.buffer[problem.problem_id]
            self.graduations += 1
            self.graduation_visits += entry.visits
            return ["graduated"]
        if pass_rate >= self.graduation_threshold:
            return []
        self.buffer[problem.problem_id] = _Entry(problem, rollout_index)
        self.admissions += 1
        events = ["admitted"]
        while len(self.buffer) > self.capacity:
            self.buffer.popitem(last=False)
            self.evictions += 1
            events.append("evicted")
        return events

    def _teacher_responses(self, trainer: Any, groups: list[RolloutGroup]) -> list[list[str]]:
        """The correct ones among ``teacher_samples`` fresh teacher responses per group's problem."""
        if not groups:
            return []
        module, data = trainer.lightning_module, trainer.datamodule
        sampling = self.teacher_sampling or data.teacher_sampling
        prompts = [module.tokenize(g.spec.student_prompt or g.spec.problem.prompt) for g in groups]
        completions = data.engine_for(module.teacher).generate(prompts, self.teacher_samples, sampling)
        correct = []
        for group, samples in zip(groups, completions):
            texts = [module.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in samples]
            correct.append([t for t in texts if score_response(t, group.spec.problem.answer) > 0])
        return correct


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
