"""PACED weighting: each row's loss weighted by a Beta kernel of the student's pass rate.

Algorithm (PACED, seed 003): the gradient signal-to-noise ratio of distillation vanishes where the
student always fails (p = 0) or always succeeds (p = 1), so every row gets the weight
``w(p) = p^alpha * (1 - p)^beta`` of the student's pass rate ``p`` on the prompt that row answers
(``alpha = beta = 1``: ``w = p(1 - p)``). The module multiplies each row's loss by the batch's
``weights``.

Which ``p`` a row uses:

- a row the student sampled (on-policy batches): the pass rate of its own group, whatever its
  kind. A replayed problem's plain group is such a group; a BCQ or NCQ group is the student's
  answers to that reformulated prompt, and its own pass rate is the signal-to-noise that matters
  for those rows (the plain problem's p is usually 0 there, which would zero every
  reformulation);
- a teacher or reference row (off-policy batches): the student's pass rate on the plain problem
  from the shared tracker, which the pipeline measures first with ``data.pass_rate.rollouts``
  student samples when its estimate is older than ``data.pass_rate.refresh_every_n_steps``.

The factors are normalised to mean 1 over the rows of every rank together (the loss keeps the
scale of unweighted training), and multiply whatever factors other hooks give. If every factor is
0 (every p in {0, 1} with ``skip_extremes``), they stay 0: the rollout contributes no gradient (the
loss is exactly 0), which is logged; a stateful optimizer such as AdamW still moves the weights by
its momentum and weight decay on such a step. With ``samples_per_prompt = 1`` every on-policy pass
rate is 0 or 1, so use G >= 2 (PACED: 8).

Per rollout it logs ``rollout/paced_weight_ess`` (effective sample size over the rows, 1 when
uniform), ``rollout/paced_weight_zero_fraction``, ``rollout/paced_weight_max`` and
``rollout/paced_pass_rate_mean``, histograms ``rollout/paced_weight`` and
``rollout/paced_pass_rate``, and adds ``batch.extras["student_pass_rate"]`` (the p of every row).
It keeps no state of its own: the pass rates it reads are the data module's shared tracker, which
is in the checkpoint.
"""

from __future__ import annotations

import logging
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_zpd.rollout.batch import RolloutBatch
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.plan import GroupSummary, RolloutGroup, RolloutHook, RolloutPlan

log = logging.getLogger(__name__)


class BetaKernelWeighting(Callback, RolloutHook):
    """Weight each row by ``p^alpha (1-p)^beta`` of the student's pass rate ``p`` (see the module doc).

    Args:
        alpha: Exponent of ``p``; >= 0. Larger values favour problems the student mostly solves.
        beta: Exponent of ``1 - p``; >= 0. Larger values favour problems the student mostly fails.
        skip_extremes: Weight 0 for ``p`` in {0, 1} (no distillation signal there), whatever
            ``alpha`` and ``beta``. With ``alpha = beta = 0`` and ``skip_extremes=False`` every
            weight is exactly 1 (unweighted training); with ``alpha = beta = 0`` and
            ``skip_extremes=True`` it is PACED's hard filter (1 for 0 < p < 1, else 0).

    Example::

        trainer = Trainer(callbacks=[BetaKernelWeighting(alpha=1.0, beta=1.0)])

    In YAML, under ``trainer.callbacks``, with the pass-rate measurement under ``data``::

        - class_path: lit_zpd.callbacks.beta_kernel.BetaKernelWeighting
          init_args: {alpha: 1.0, beta: 1.0}
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, skip_extremes: bool = True) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"BetaKernelWeighting: {name} must be a finite number >= 0, got {value}")
        self.alpha = alpha
        self.beta = beta
        self.skip_extremes = skip_extremes
        self._row_pass_rates: list[float] = []  # this rank's rows of the rollout being built

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta, skip_extremes=self.skip_extremes)

    def kernel(self, pass_rate: float) -> float:
        """Unnormalised weight ``w(p)``."""
        if self.skip_extremes and pass_rate in (0.0, 1.0):
            return 0.0
        return pass_rate**self.alpha * (1.0 - pass_rate) ** self.beta

    def pass_rate_of(self, ctx: RolloutContext, summary: GroupSummary) -> float:
        """The ``p`` of a group's rows: its own pass rate if the student wrote it, else the
        tracker's estimate of the plain problem."""
        if summary.on_policy:
            return summary.pass_rate
        estimate = ctx.pass_rates.get(summary.problem_id)
        if estimate is None:
            raise RuntimeError(f"BetaKernelWeighting: no student pass rate of {summary.problem_id!r} was measured")
        return estimate

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def rollout_controls(self) -> set[str]:
        return {"extras.student_pass_rate"}

    @override
    def needs_pass_rates(self) -> bool:
        return True

    @override
    def on_weight(
        self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup], summaries: list[GroupSummary]
    ) -> list[list[float]]:
        every_rank = [(self.pass_rate_of(ctx, s), len(s.rewards)) for s in summaries]
        # This rank's groups are its summaries, in the same order.
        mine = [p for s, (p, _) in zip(summaries, every_rank) if s.rank == ctx.rank]
        rows = sum(n for _, n in every_rank)
        total = sum(self.kernel(p) * n for p, n in every_rank)
        if total <= 0:
            log.info("BetaKernelWeighting: every weight of rollout %d is 0 (p in {0, 1}): no gradient", plan.rollout_index)
        scale = rows / total if total > 0 else 0.0
        self._row_pass_rates = [p for g, p in zip(groups, mine) for _ in g.weights]
        weights = torch.tensor([self.kernel(p) * scale for p, n in every_rank for _ in range(n)])
        squares = weights.pow(2).sum()
        plan.metrics |= {
            "rollout/paced_weight_ess": float(weights.sum() ** 2 / (squares * len(weights))) if squares > 0 else 0.0,
            "rollout/paced_weight_zero_fraction": float((weights == 0).float().mean()),
            "rollout/paced_weight_max": float(weights.max()),
            "rollout/paced_pass_rate_mean": sum(p * n for p, n in every_rank) / rows,
        }
        plan.histograms["rollout/paced_weight"] = weights
        plan.histograms["rollout/paced_pass_rate"] = torch.tensor([p for p, n in every_rank for _ in range(n)])
        return [[self.kernel(p) * scale] * len(g.weights) for g, p in zip(groups, mine)]

    @override
    def on_build(self, ctx: RolloutContext, plan: RolloutPlan, batch: RolloutBatch) -> None:
        batch.extras["student_pass_rate"] = torch.tensor(self._row_pass_rates, dtype=torch.float32)
