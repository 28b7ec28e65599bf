"""PACED weighting: each problem's loss weighted by a Beta kernel of the student's pass rate.

Algorithm (PACED, seed 003): the gradient signal-to-noise ratio of distillation vanishes where the
student always fails (p = 0) or always succeeds (p = 1), so every sample of a problem gets the
weight ``w(p) = p^alpha * (1 - p)^beta`` of the student's pass rate ``p`` on that problem
(``alpha = beta = 1``: ``w = p(1 - p)``). The loss becomes ``sum_i w_i * divergence_i``: the
module multiplies each sample's token-mean loss by the batch's ``weights``.

Where ``p`` comes from:

- On-policy batches (the student's own rollouts, ``plan.source == "student"``): a ``plain``
  group's own pass rate; no extra sampling.
- Everything else (teacher or reference responses, and reformulated ``bcq``/``ncq`` groups whose
  plain group is not in the batch): the student samples ``rollouts_for_pass_rate`` (K)
  completions of the plain problem through ``trainer.datamodule.engine_for(student)``, scored by
  the data module's verifier. These extra rollouts are seeded from ``(data.seed, batch index)``
  so a resumed run measures exactly what an uninterrupted one would.

Estimates are cached per problem as ``problem_id -> (pass_rate, rollouts, step measured)``. A new
measurement replaces the old one (the student has moved since, so old samples are not pooled); an
estimate is reused while it is younger than ``refresh_every_n_steps`` optimizer steps. The default
1 re-measures at every visit (the paper's "p refreshed whenever a problem is rolled out");
larger values trade freshness for fewer rollouts on off-policy batches. On-policy batches refresh
the cache for free, so GKD-style mixing (``data.lmbda``) pays K rollouts only for problems the
student has not rolled out recently.

Deliberate simplifications: weights multiply whatever weights the group already carries (1 unless
another hook changed them) and are then normalised to mean 1 over all samples of the batch, so
the loss keeps the scale of unweighted training (with ``data.ppo_minibatches`` the mean is 1 over
the whole rollout, not over each minibatch). If every weight is 0 (every problem has p in
{0, 1} with ``skip_extremes``), the weights stay 0: the batch contributes no gradient (the loss
is exactly 0), which is logged; note that a stateful optimizer such as AdamW still moves the
weights by its momentum and weight decay on such a step. With ``samples_per_prompt = 1`` every
on-policy pass rate is 0 or 1, so use G >= 2 (PACED: 8).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_zpd.rollout.datamodule import seeded
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.tasks.problem import Problem

log = logging.getLogger(__name__)


class BetaKernelWeighting(Callback, RolloutHook):
    """Weight each sample by ``p^alpha (1-p)^beta`` of its problem's student pass rate ``p``.

    Args:
        alpha: Exponent of ``p``; >= 0. Larger values favour problems the student mostly solves.
        beta: Exponent of ``1 - p``; >= 0. Larger values favour problems the student mostly fails.
        skip_extremes: Weight 0 for problems with ``p`` in {0, 1} (no distillation signal there),
            whatever ``alpha`` and ``beta``. With ``alpha = beta = 0`` and ``skip_extremes=False``
            every weight is exactly 1 (unweighted training).
        rollouts_for_pass_rate: K, student completions sampled per problem to estimate ``p`` when
            the batch is not the student's own rollouts.
        temperature: Sampling temperature of those K completions; > 0.
        max_new_tokens: Length cap of those completions; ``None`` takes the data module's
            ``sampling.max_new_tokens``.
        refresh_every_n_steps: A cached estimate is reused while it is younger than this many
            optimizer steps; 1 re-measures at every visit.
        histogram_every_n_steps: Period of the weight and pass-rate histograms in TensorBoard.

    Example::

        trainer = Trainer(callbacks=[BetaKernelWeighting(alpha=1.0, beta=1.0)])

    In YAML, under ``trainer.callbacks``::

        - class_path: lit_zpd.callbacks.beta_kernel.BetaKernelWeighting
          init_args: {alpha: 1.0, beta: 1.0, rollouts_for_pass_rate: 8}
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        skip_extremes: bool = True,
        rollouts_for_pass_rate: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        refresh_every_n_steps: int = 1,
        histogram_every_n_steps: int = 50,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"BetaKernelWeighting: {name} must be a finite number >= 0, got {value}")
        for name, count in (
            ("rollouts_for_pass_rate", rollouts_for_pass_rate),
            ("refresh_every_n_steps", refresh_every_n_steps),
            ("histogram_every_n_steps", histogram_every_n_steps),
        ):
            if count < 1:
                raise ValueError(f"BetaKernelWeighting: {name} must be >= 1, got {count}")
        if not temperature > 0:
            raise ValueError(f"BetaKernelWeighting: temperature must be > 0, got {temperature}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"BetaKernelWeighting: max_new_tokens must be >= 1 or null, got {max_new_tokens}")
        self.alpha = alpha
        self.beta = beta
        self.skip_extremes = skip_extremes
        self.rollouts_for_pass_rate = rollouts_for_pass_rate
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.refresh_every_n_steps = refresh_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.estimates: dict[str, tuple[float, int, int]] = {}
        self._last_batch_rollouts: tuple[int, int] = (-1, 0)  # (batch index, extra rollouts spent)
        self._pass_rates: tuple[int, list[float]] = (-1, [])  # (batch index, p per row)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta)

    def kernel(self, pass_rate: float) -> float:
        """Unnormalised weight ``w(p)``."""
        if self.skip_extremes and pass_rate in (0.0, 1.0):
            return 0.0
        return pass_rate**self.alpha * (1.0 - pass_rate) ** self.beta

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def on_rollout_scored(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> None:
        if not groups:
            return
        step = trainer.global_step
        own: dict[int, float] = {}
        if plan.source == "student":
            for k, group in enumerate(groups):
                if group.spec.kind == "plain" and group.rewards:
                    own[k] = group.pass_rate
                    self.estimates[group.spec.problem.problem_id] = (group.pass_rate, len(group.rewards), step)
        others = [g.spec.problem for k, g in enumerate(groups) if k not in own]
        spent = self._measure(trainer, plan, others, step)
        self._last_batch_rollouts = (plan.index, spent)
        pass_rates = [
            own[k] if k in own else self.estimates[g.spec.problem.problem_id][0] for k, g in enumerate(groups)
        ]
        raw = [[w * self.kernel(p) for w in g.weights] for g, p in zip(groups, pass_rates)]
        total = sum(sum(row) for row in raw)
        samples = sum(len(row) for row in raw)
        if total <= 0:
            log.info("BetaKernelWeighting: every weight of batch %d is 0 (p in {0, 1}): no gradient", plan.index)
        scale = samples / total if total > 0 else 0.0
        for group, row in zip(groups, raw):
            group.weights = [w * scale for w in row]
        self._pass_rates = (plan.index, [p for g, p in zip(groups, pass_rates) for _ in g.weights])

    @override
    def on_batch_built(self, trainer: Any, plan: RolloutPlan, batch: dict[str, Any]) -> None:
        index, rows = self._pass_rates
        if index == plan.index and len(rows) == batch["weights"].shape[0]:
            batch["student_pass_rate"] = torch.tensor(rows, dtype=torch.float32)

    def _measure(self, trainer: Any, plan: RolloutPlan, problems: list[Problem], step: int) -> int:
        """Sample K student completions of every problem whose estimate is missing or stale."""
        stale: dict[str, Problem] = {}
        for problem in problems:
            cached = self.estimates.get(problem.problem_id)
            if cached is None or step - cached[2] >= self.refresh_every_n_steps:
                stale.setdefault(problem.problem_id, problem)
        if not stale:
            return 0
        data, module = trainer.datamodule, trainer.lightning_module
        sampling = SamplingConfig(
            temperature=self.temperature, max_new_tokens=self.max_new_tokens or data.sampling.max_new_tokens
        )
        prompts = [module.tokenize(p.prompt) for p in stale.values()]
        with seeded(data.seed, "paced", plan.index):
            completions = data.engine_for(module.student).generate(prompts, self.rollouts_for_pass_rate, sampling)
        # These are student rollouts too: they count toward the run's rollout budget.
        data.student_tokens += sum(len(c.token_ids) for samples in completions for c in samples)
        for problem, samples in zip(stale.values(), completions):
            group = data.score(PromptSpec(problem), [c.token_ids for c in samples])
            self.estimates[problem.problem_id] = (group.pass_rate, len(samples), step)
        return len(stale) * self.rollouts_for_pass_rate

    # ----------------------------------------------------------------------------- logging

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if "student_pass_rate" not in batch:
            return
        weights = batch["weights"].float()  # (B,)
        pass_rate = batch["student_pass_rate"]  # (B,)
        size = weights.shape[0]
        squares = weights.pow(2).sum()
        ess = weights.sum() ** 2 / (squares * size) if squares > 0 else squares
        index, spent = self._last_batch_rollouts
        rollout_index = batch.get("rollout_index", batch["batch_index"])
        first_of_rollout = index == rollout_index and not batch.get("minibatch_index")
        pl_module.log_dict(
            {
                "train/paced_weight_ess": ess,
                "train/paced_weight_zero_fraction": (weights == 0).float().mean(),
                "train/paced_weight_max": weights.max(),
                "rollout/paced_pass_rate_mean": pass_rate.mean(),
                "rollout/paced_estimate_rollouts": float(spent if first_of_rollout else 0),
                "rollout/paced_tracked_problems": float(len(self.estimates)),
            },
            batch_size=size,
        )
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger) and trainer.global_step % self.histogram_every_n_steps == 0:
            logger.experiment.add_histogram("train/paced_weight", weights, trainer.global_step)
            logger.experiment.add_histogram("rollout/paced_pass_rate", pass_rate, trainer.global_step)

    # ----------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pass_rates": {pid: [p, count, step] for pid, (p, count, step) in self.estimates.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.estimates = {
            str(pid): (float(v[0]), int(v[1]), int(v[2])) for pid, v in state_dict.get("pass_rates", {}).items()
        }
