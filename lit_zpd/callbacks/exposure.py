"""How much of the reference a privileged self-teacher sees: OPSD's fixed context and ATESD's
learned exposure.

OPSD (on-policy self-distillation): the teacher is the student itself (``model.teacher:
self_initial`` or ``self_live``) reading a privileged context, the problem with its reference
solution; the student sees the problem alone and the per-token divergence is taken on the
student's own rollouts. :class:`PrivilegedTeacher` attaches that context to every planned plain
prompt (``PromptSpec.teacher_prompt``) at a fixed reveal ratio through the source's
:class:`~lit_zpd.tasks.privileged.PrivilegedContext`.

ATESD (seed 004): full exposure gives token targets too strong for the student to absorb, so the
reveal ratio ``a`` is a decision. :class:`ExposureController` samples ``a`` from a Beta policy
whose parameters ``(alpha, beta) = 1 + softplus(f_phi(s))`` come from a small MLP over the training
state ``s`` (normalised progress, EMAs of recent ``a``, of the training loss, of the student-teacher
mismatch and of a probe NLL, and the batch-mean student confidence); one ``a`` serves every prompt,
held for ``hold_steps`` optimizer steps. Each decision ``d`` made at step ``t0`` is scored after a
``lookahead``-step look-ahead with the discounted learning-progress reward

    ``G_lp = sum_{i=1..L} gamma^(i-1) * max(0, loss_(t0+i-1) - loss_(t0+i))``

plus ``lambda_gt`` times ``G_gt``, the discounted mean (over the decision's hold window) of the
teacher's mean per-token log-probability of the reference solutions of a fixed probe set read in
its exposure-``a`` context. Every ``decisions_per_update`` completed decisions the controller takes
one REINFORCE step on ``-A * log pi(a | s)`` with the advantage ``A`` normalised over those
decisions, plus the one-sided entropy penalty ``c * max(0, H[pi(.|s)] - H_target)^2``.

What ``loss_t`` is: by default the student's mean NLL of the probe set's reference solutions after
``t`` optimizer steps (``progress_loss: probe_nll``), measured when a rollout is planned: it does not
depend on ``a``; ``train_loss`` uses the training loss of step ``t`` instead, which the exposure
itself moves. The paper publishes neither ``H``, ``L``, ``gamma`` nor ``lambda_gt``; the defaults
are METHODS.md's reading.

Modes, for the paper's ablations: ``learned`` (ATESD), ``fixed`` (``a = reveal_ratio``), ``random``
(``a`` uniform in ``[ratio_min, ratio_max]``) and ``one_step`` (learned with the one-step
learning progress, ``L = 1``, plus the same ``lambda_gt * G_gt``). Every mode measures and logs the
same rewards; only ``learned`` and ``one_step`` update the controller.

``G_gt`` rises with ``a`` by construction (the teacher reads part of what it is scored on): with
a small ``lambda_gt`` it is a mild pull toward more exposure against ``G_lp``. The progress feature
is ``t / trainer.max_steps`` (0 when ``max_steps`` is unbounded). Gradient accumulation is refused:
rewards are per optimizer step.

Logs per rollout ``exposure/reveal_ratio`` and ``exposure/probe_nll``; per decision
``exposure/policy_alpha`` and ``exposure/policy_beta``; per controller update (every
``decisions_per_update`` completed decisions) ``exposure/reward``, ``exposure/g_lp``, ``exposure/g_gt``, ``exposure/policy_entropy``,
``exposure/controller_loss``. The student-teacher mismatch is the module's ``train/forward_kl``
(``train/forward_kl_unclipped`` under OPSD's per-entry clip).

State: the controller's weights and Adam state, the pending and completed decisions, the losses
they still need, the EMAs and the probe set are in ``state_dict`` as plain data and tensors. Its
random draws come from streams seeded by ``(seed, "exposure", decision index)``, the same on every
rank, so there is no generator state to save and a resumed run draws what an uninterrupted one
would. Every measurement that enters a reward or a feature (the probe NLL, the teacher's
log-probability, the training loss and mismatch, the confidence) is averaged over all ranks, so
every rank takes the same decisions and the same controller steps.

Plain prompts only get the context: BCQ and NCQ prompts (ZPPO) are the student's reformulations,
and the teacher reads them as the student does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.distributions import Beta
from typing_extensions import override

from lit_zpd.rollout.context import RolloutContext, seeded
from lit_zpd.rollout.plan import RolloutHook, RolloutPlan
from lit_zpd.tasks.privileged import CONTEXT_COPY_MARK, PrivilegedContext, SegmentBy

ExposureMode = Literal["learned", "fixed", "random", "one_step"]
ProgressLoss = Literal["probe_nll", "train_loss"]
FEATURES = ("progress", "ratio_ema", "loss_ema", "mismatch_ema", "probe_nll_ema", "confidence")
_MISMATCH_TERMS = ("forward_kl_unclipped", "forward_kl", "jsd_unclipped", "jsd", "reverse_kl_unclipped", "reverse_kl")


class PrivilegedTeacher(Callback, RolloutHook):
    """OPSD: the teacher reads every plain prompt with its reference solution (see the module doc).

    Args:
        reveal_ratio: Share ``a`` of the reference's reasoning segments the teacher sees (the
            first ``floor(a * m)``); the final answer is always shown. 1 is OPSD.
        template: The teacher context, with ``{problem}`` and ``{solution}``; ``None`` takes the
            source's (:meth:`~lit_zpd.tasks.problem.ProblemSource.privileged_context`: OPSD's
            template, or the compact one the embedded models read).
        segment_by: ``lines``, ``blank_lines`` or ``sentences``; ``None`` takes the source's.

    Example, in YAML under ``trainer.callbacks`` (with ``model.teacher: self_initial``)::

        - class_path: lit_zpd.callbacks.exposure.PrivilegedTeacher
          init_args: {reveal_ratio: 1.0}
    """

    def __init__(self, reveal_ratio: float = 1.0, template: str | None = None, segment_by: SegmentBy | None = None) -> None:
        if not 0.0 <= reveal_ratio <= 1.0:
            raise ValueError(f"{type(self).__name__}: reveal_ratio must be in [0, 1], got {reveal_ratio}")
        if segment_by is not None and segment_by not in get_args(SegmentBy):
            raise ValueError(f"{type(self).__name__}: segment_by must be one of {get_args(SegmentBy)}, got {segment_by!r}")
        if template is not None:
            PrivilegedContext(template)  # validates the fields
        self.reveal_ratio = reveal_ratio
        self.template = template
        self.segment_by = segment_by
        self._context: PrivilegedContext | None = None

    def context(self, ctx: RolloutContext) -> PrivilegedContext:
        """The source's privileged context with this callback's overrides."""
        if self._context is None:
            base = ctx.source.privileged_context()
            self._context = PrivilegedContext(
                self.template or base.template, self.segment_by or base.segment_by, base.answer_format
            )
        return self._context

    def ratio_for(self, ctx: RolloutContext, plan: RolloutPlan) -> float:
        """The reveal ratio of this rollout."""
        return self.reveal_ratio

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "teacher", None) is None:
            raise ValueError(f"{type(self).__name__}: a privileged teacher needs model.teacher (self_initial for OPSD)")
        source = getattr(trainer.datamodule, "source", None)
        missing = next((p.problem_id for p in source.problems("train") if not p.reference), None) if source else None
        if missing is not None:
            raise ValueError(
                f"{type(self).__name__}: training problem {missing!r} has no reference solution; a privileged teacher "
                "reads every problem's reference (map a reference field in data.source)"
            )

    @override
    def rollout_controls(self) -> set[str]:
        return {"teacher_context"}

    @override
    def on_plan(self, ctx: RolloutContext, plan: RolloutPlan) -> None:
        ratio = self.ratio_for(ctx, plan)
        context = self.context(ctx)
        for spec in plan.prompts:
            if spec.kind == "plain":
                spec.teacher_prompt = context.reveal(spec.problem, ratio)
        plan.metrics["exposure/reveal_ratio"] = ratio


@dataclass
class Decision:
    """One held exposure decision, as plain data.

    Args:
        index: Decisions made before it.
        start: Optimizer steps taken when it was made (``t0``).
        features: The state ``s`` it was made in.
        sample: The Beta sample (before clipping; its log-probability is what REINFORCE moves).
        ratio: The reveal ratio used, the sample clipped to ``[ratio_min, ratio_max]``.
        teacher_logprobs: The teacher's mean probe log-probability after each optimizer step the
            decision was held for (its exposure-``a`` context).
    """

    index: int
    start: int
    features: list[float]
    sample: float
    ratio: float
    teacher_logprobs: list[float] = field(default_factory=list)


class ExposureController(PrivilegedTeacher):
    """ATESD: a Beta-policy controller sets the privileged teacher's reveal ratio (see the module doc).

    Args:
        mode: ``learned`` (ATESD), ``fixed`` (``reveal_ratio``), ``random`` (uniform) or
            ``one_step`` (learned with the immediate loss change as reward).
        reveal_ratio: The ratio of mode ``fixed``.
        hold_steps: ``H``, optimizer steps one decision is held.
        lookahead: ``L``, optimizer steps after a decision's start over which its learning
            progress is summed (``one_step`` uses 1).
        gamma: Discount of the learning-progress reward.
        lambda_gt: Weight of the teacher-grounded term ``G_gt``.
        ratio_min: Lower clip of the sampled ratio.
        ratio_max: Upper clip of the sampled ratio.
        hidden_size: Width of the controller MLP.
        num_layers: Hidden layers of the controller MLP.
        lr: Adam learning rate of the controller.
        decisions_per_update: ``B``, completed decisions per REINFORCE step.
        entropy_target: ``H_target``; ``None`` is the entropy of Beta(2, 2).
        entropy_coef: ``c`` of the one-sided entropy penalty.
        probe_size: Training problems in the fixed probe set (shared out over ranks).
        progress_loss: ``probe_nll`` or ``train_loss`` (see the module doc).
        ema: Smoothing of the EMA features.
        template: As in :class:`PrivilegedTeacher`.
        segment_by: As in :class:`PrivilegedTeacher`.

    Example, in YAML under ``trainer.callbacks`` (with ``model.teacher: self_initial``)::

        - class_path: lit_zpd.callbacks.exposure.ExposureController
          init_args: {hold_steps: 8, lookahead: 16}
    """

    def __init__(
        self,
        mode: ExposureMode = "learned",
        reveal_ratio: float = 1.0,
        hold_steps: int = 8,
        lookahead: int = 16,
        gamma: float = 0.9,
        lambda_gt: float = 0.1,
        ratio_min: float = 0.05,
        ratio_max: float = 1.0,
        hidden_size: int = 64,
        num_layers: int = 2,
        lr: float = 1e-3,
        decisions_per_update: int = 8,
        entropy_target: float | None = None,
        entropy_coef: float = 1.0,
        probe_size: int = 16,
        progress_loss: ProgressLoss = "probe_nll",
        ema: float = 0.9,
        template: str | None = None,
        segment_by: SegmentBy | None = None,
    ) -> None:
        super().__init__(reveal_ratio, template, segment_by)
        if mode not in get_args(ExposureMode):
            raise ValueError(f"ExposureController: mode must be one of {get_args(ExposureMode)}, got {mode!r}")
        if progress_loss not in get_args(ProgressLoss):
            raise ValueError(f"ExposureController: progress_loss must be one of {get_args(ProgressLoss)}, got {progress_loss!r}")
        for name, value in (("hold_steps", hold_steps), ("lookahead", lookahead), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("decisions_per_update", decisions_per_update), ("probe_size", probe_size)):
            if value < 1:
                raise ValueError(f"ExposureController: {name} must be >= 1, got {value}")
        if not 0.0 <= ratio_min < ratio_max <= 1.0:
            raise ValueError(f"ExposureController: need 0 <= ratio_min < ratio_max <= 1, got {ratio_min} and {ratio_max}")
        for name, value in (("gamma", gamma), ("ema", ema)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ExposureController: {name} must be in [0, 1], got {value}")
        if decisions_per_update < 2 and mode in ("learned", "one_step"):
            raise ValueError("ExposureController: decisions_per_update must be >= 2 to normalise the advantage")
        self.mode = mode
        self.hold_steps = hold_steps
        self.lookahead = 1 if mode == "one_step" else lookahead
        self.gamma = gamma
        self.lambda_gt = lambda_gt
        self.ratio_min = ratio_min
        self.ratio_max = ratio_max
        self.decisions_per_update = decisions_per_update
        self.entropy_target = float(Beta(torch.tensor(2.0), torch.tensor(2.0)).entropy()) if entropy_target is None else entropy_target
        self.entropy_coef = entropy_coef
        self.probe_size = probe_size
        self.progress_loss = progress_loss
        self.ema = ema
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the controller's initial weights do not depend on the caller's RNG
            layers: list[nn.Module] = []
            width = len(FEATURES)
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden_size), nn.Tanh()]
                width = hidden_size
            self.policy = nn.Sequential(*layers, nn.Linear(width, 2))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        # Run state (all in state_dict).
        self.decisions_made = 0
        self.updates = 0
        self.current: Decision | None = None
        self.pending: list[Decision] = []  # waiting for their look-ahead
        self.completed: list[tuple[Decision, float, float]] = []  # (decision, G_lp, G_gt) awaiting an update
        self.losses: dict[int, float] = {}  # loss_t by optimizer steps t
        self.emas: dict[str, float] = {}
        self.confidence = 0.0
        self.probe_ids: list[str] = []
        self.probe_nll = math.nan  # the last measurement, at ``measured_version``
        self.measured_version = -1
        self._max_steps = 0
        self._ctx: RolloutContext | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, reveal_ratio=self.reveal_ratio)

    def summary(self) -> dict[str, float]:
        """Run-level counts for reports."""
        return {"decisions": float(self.decisions_made), "controller_updates": float(self.updates),
                "last_ratio": self.current.ratio if self.current else float("nan")}

    # ----------------------------------------------------------------------------- policy

    def distribution(self, features: Tensor) -> Beta:
        """The Beta policy ``pi(. | s)`` for features ``(..., 6)``: ``(alpha, beta) = 1 + softplus(f(s))``."""
        out = self.policy(features)
        params = 1.0 + nn.functional.softplus(out)
        return Beta(params[..., 0], params[..., 1])

    def features(self, version: int) -> list[float]:
        """The training state ``s`` after ``version`` optimizer steps (see ``FEATURES``)."""
        progress = version / self._max_steps if self._max_steps > 0 else 0.0
        return [
            progress,
            self.emas.get("ratio", self.reveal_ratio),
            self.emas.get("loss", 0.0),
            self.emas.get("mismatch", 0.0),
            self.emas.get("probe_nll", 0.0),
            self.confidence,
        ]

    def reward(self, decision: Decision) -> tuple[float, float]:
        """``(G_lp, G_gt)`` of a decision whose look-ahead is complete."""
        t0 = decision.start
        g_lp = sum(
            self.gamma ** (i - 1) * max(0.0, self.losses[t0 + i - 1] - self.losses[t0 + i])
            for i in range(1, self.lookahead + 1)
        )
        return g_lp, _discounted_mean(decision.teacher_logprobs, self.gamma)

    def returns(self, completed: list[tuple[Decision, float, float]]) -> list[float]:
        """``R = G_lp + lambda_gt * G_gt`` of each completed decision."""
        return [g_lp + self.lambda_gt * g_gt for _, g_lp, g_gt in completed]

    def update(self, completed: list[tuple[Decision, float, float]]) -> dict[str, float]:
        """One REINFORCE step over completed decisions; returns what to log."""
        rewards = torch.tensor(self.returns(completed))
        std = rewards.std(correction=0)
        advantages = (rewards - rewards.mean()) / (std + 1e-8) if std > 0 else torch.zeros_like(rewards)
        device = next(self.policy.parameters()).device
        features = torch.tensor([d.features for d, _, _ in completed], device=device)
        samples = torch.tensor([d.sample for d, _, _ in completed], device=device).clamp(1e-6, 1 - 1e-6)
        policy = self.distribution(features)
        entropy = policy.entropy()
        loss = -(advantages.to(device) * policy.log_prob(samples)).mean()
        loss = loss + self.entropy_coef * (entropy - self.entropy_target).clamp(min=0).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return {"exposure/controller_loss": float(loss.detach()), "exposure/policy_entropy": float(entropy.detach().mean()),
                "exposure/updates": float(self.updates)}

    # ----------------------------------------------------------------------------- rollout hooks

    @override
    def ratio_for(self, ctx: RolloutContext, plan: RolloutPlan) -> float:
        # No collective here: every input was gathered after the optimizer steps (see
        # on_train_batch_end), so a rank that fails in an earlier hook cannot leave others waiting.
        version = plan.policy_version
        metrics = plan.metrics
        ready = [d for d in self.pending if all(d.start + i in self.losses for i in range(self.lookahead + 1))]
        for decision in ready:
            self.pending.remove(decision)
            # A copy: the current decision may still be held (look-ahead shorter than the hold).
            self.completed.append((replace(decision, teacher_logprobs=list(decision.teacher_logprobs)), *self.reward(decision)))
        if len(self.completed) >= self.decisions_per_update:
            batch, self.completed = self.completed, []
            metrics["exposure/reward"] = sum(self.returns(batch)) / len(batch)
            metrics["exposure/g_lp"] = sum(g for _, g, _ in batch) / len(batch)
            metrics["exposure/g_gt"] = sum(g for _, _, g in batch) / len(batch)
            if self.mode in ("learned", "one_step"):
                metrics |= self.update(batch)
        if self.current is None or version >= self.current.start + self.hold_steps:
            self.current = self._decide(ctx, version, metrics)
            self.pending.append(self.current)
            self.emas["ratio"] = _ema(self.emas.get("ratio"), self.current.ratio, self.ema)
        metrics["exposure/probe_nll"] = self.probe_nll
        # Keep the losses the unfinished decisions still need.
        oldest = min((d.start for d in self.pending), default=version)
        self.losses = {t: v for t, v in self.losses.items() if t >= oldest}
        return self.current.ratio

    # ----------------------------------------------------------------------------- training hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "ExposureController: trainer.accumulate_grad_batches must be 1 (its rewards are per optimizer step); "
                "raise data.prompts_per_step instead"
            )
        self._max_steps = max(trainer.max_steps, 0)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.to(pl_module.device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ctx = trainer.datamodule.context
        if self.measured_version != pl_module.global_step:  # a fresh run: the starting weights
            self._record(self._ctx, pl_module.global_step, self._gather_probe(self._ctx, with_teacher=False))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every optimizer step: one gather of the step's loss, mismatch and confidence and of
        the probe measurements of the new weights, so every rank holds the same numbers."""
        ctx = self._ctx
        assert ctx is not None, "on_train_start sets the context"
        terms = outputs.get("terms", {}) if isinstance(outputs, dict) else {}
        mismatch = next((float(terms[k]) for k in _MISMATCH_TERMS if k in terms), 0.0)
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        confidence = (0.0, 0)
        if getattr(batch, "sampling_logprobs", None) is not None:
            mask = batch.response_mask.bool()
            confidence = (float(batch.sampling_logprobs[mask].exp().sum()), int(mask.sum()))
        parts = ctx.gather(((loss, mismatch, *confidence), self._probe_sums(ctx, with_teacher=True)))
        loss = sum(p[0][0] for p in parts) / len(parts)
        mismatch = sum(p[0][1] for p in parts) / len(parts)
        total, count = sum(p[0][2] for p in parts), sum(p[0][3] for p in parts)
        if count:
            self.confidence = total / count
        self.emas["loss"] = _ema(self.emas.get("loss"), loss, self.ema)
        self.emas["mismatch"] = _ema(self.emas.get("mismatch"), mismatch, self.ema)
        if self.progress_loss == "train_loss":
            self.losses[pl_module.global_step - 1] = loss  # the loss of the weights after t steps
        # The weights after this optimizer step, measured here so that no version is missed when
        # one rollout serves several steps (data.ppo_minibatches).
        self._record(ctx, pl_module.global_step, _combine([p[1] for p in parts]))

    # ----------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "decisions_made": self.decisions_made,
            "updates": self.updates,
            "current": asdict(self.current) if self.current is not None else None,
            "pending": [asdict(d) for d in self.pending],
            "completed": [(asdict(d), g_lp, g_gt) for d, g_lp, g_gt in self.completed],
            "losses": dict(self.losses),
            "emas": dict(self.emas),
            "confidence": self.confidence,
            "probe_ids": list(self.probe_ids),
            "probe_nll": self.probe_nll,
            "measured_version": self.measured_version,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict["policy"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.decisions_made = int(state_dict["decisions_made"])
        self.updates = int(state_dict["updates"])
        self.pending = [Decision(**d) for d in state_dict["pending"]]
        current = state_dict["current"]
        # The current decision is also pending (until its look-ahead ends): keep them one object.
        self.current = next((d for d in self.pending if current and d.index == current["index"]), None)
        if self.current is None and current is not None:
            self.current = Decision(**current)
        self.completed = [(Decision(**d), float(g_lp), float(g_gt)) for d, g_lp, g_gt in state_dict["completed"]]
        self.losses = {int(t): float(v) for t, v in state_dict["losses"].items()}
        self.emas = {k: float(v) for k, v in state_dict["emas"].items()}
        self.confidence = float(state_dict["confidence"])
        self.probe_ids = list(state_dict["probe_ids"])
        self.probe_nll = float(state_dict["probe_nll"])
        self.measured_version = int(state_dict["measured_version"])

    # ----------------------------------------------------------------------------- internals

    def _decide(self, ctx: RolloutContext, version: int, metrics: dict[str, float]) -> Decision:
        features = self.features(version)
        index = self.decisions_made
        self.decisions_made += 1
        device = next(self.policy.parameters()).device
        with torch.no_grad():
            policy = self.distribution(torch.tensor(features, device=device))
        metrics["exposure/policy_alpha"] = float(policy.concentration1)
        metrics["exposure/policy_beta"] = float(policy.concentration0)
        if self.mode == "fixed":
            sample = self.reveal_ratio
        elif self.mode == "random":
            sample = ctx.rng("exposure", index).uniform(self.ratio_min, self.ratio_max)
        else:
            with seeded(ctx.seed, "exposure", index):  # the same draw on every rank
                sample = float(policy.sample().cpu())
        ratio = sample if self.mode == "fixed" else min(max(sample, self.ratio_min), self.ratio_max)
        return Decision(index=index, start=version, features=features, sample=sample, ratio=ratio)

    def _probe(self, ctx: RolloutContext) -> list[Any]:
        if not self.probe_ids:
            pool = [p for p in ctx.problems("train") if p.reference and CONTEXT_COPY_MARK not in p.problem_id]
            pool = ctx.fitting(pool, lambda p: self.context(ctx).reveal(p, 1.0))  # the longest context fits
            if not pool:
                raise ValueError("ExposureController: no training problem has a reference solution for the probe set")
            self.probe_ids = [p.problem_id for p in ctx.rng("exposure", "probe").sample(pool, min(self.probe_size, len(pool)))]
        return [ctx.problem(pid) for pid in self.probe_ids]

    def _probe_sums(self, ctx: RolloutContext, with_teacher: bool) -> tuple[float, int, float, int]:
        """This rank's share of the probe: the student's summed log-probability of the reference
        solutions from the problem alone and, under the current decision, the teacher's from its
        exposure-``a`` context, with their token counts."""
        problems = self._probe(ctx)
        rows = list(range(ctx.rank, len(problems), ctx.world_size))
        mine = [problems[i] for i in rows]
        references = [p.reference for p in mine]
        student = ctx.response_logprobs(ctx.student, [p.prompt for p in mine], references) if mine else []
        teacher = []
        if with_teacher and self.current is not None and mine:
            context = self.context(ctx)
            teacher = ctx.response_logprobs(ctx.teacher, [context.reveal(p, self.current.ratio) for p in mine], references)
        return (sum(float(v.sum()) for v in student), sum(len(v) for v in student),
                sum(float(v.sum()) for v in teacher), sum(len(v) for v in teacher))

    def _gather_probe(self, ctx: RolloutContext, with_teacher: bool) -> tuple[float, int, float, int]:
        return _combine(ctx.gather(self._probe_sums(ctx, with_teacher)))

    def _record(self, ctx: RolloutContext, version: int, sums: tuple[float, int, float, int]) -> None:
        """Store the probe measurements of the weights after ``version`` optimizer steps."""
        s_sum, s_count, t_sum, t_count = sums
        self.probe_nll = -s_sum / s_count if s_count else 0.0
        self.emas["probe_nll"] = _ema(self.emas.get("probe_nll"), self.probe_nll, self.ema)
        self.measured_version = version
        if self.progress_loss == "probe_nll":
            self.losses[version] = self.probe_nll
        if t_count and self.current is not None:
            self.current.teacher_logprobs.append(t_sum / t_count)


def _ema(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None or math.isnan(previous) else decay * previous + (1 - decay) * value


def _discounted_mean(values: list[float], gamma: float) -> float:
    if not values:
        return 0.0
    weights = [gamma**i for i in range(len(values))]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def _combine(parts: list[tuple[float, int, float, int]]) -> tuple[float, int, float, int]:
    """Sum every rank's probe sums and counts."""
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), sum(p[3] for p in parts))
