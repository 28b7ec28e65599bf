"""Two-stage divergence schedule: one loss and data source before a step, another after it.

PACED (seed 003) distils best with forward KL(p_T || p_S) on teacher or reference responses
first (mode coverage) and reverse KL(p_S || p_T) on the student's own rollouts after
(consolidation), switching at 50% of training. :class:`KLSchedule` implements any such pair of
:class:`ScheduleStage` objects.

What it changes: the rollout's ``data_source`` and ``loss`` (both declared rollout controls, so no
other hook may set them). In the plan phase of every rollout it sets ``plan.data_source`` to the
stage's source (GKD's ``data.lmbda`` mixing is overridden) and ``plan.loss`` to the module's
``model.loss`` with the stage's coefficients (coefficients the stage does not name are 0; settings
it names, such as ``jsd_beta`` or ``temperature``, replace the model's, the others are kept). The
module trains each batch with the loss it carries; nothing of the module or the data module is
modified.

When: stage ``after`` plans every rollout whose ``policy_version`` (optimizer steps taken) is at
least the switch step. With ``data.ppo_minibatches`` a stage changes only between rollouts, since
the minibatches of one rollout carry its loss. The switch is one-way and saved in the checkpoint:
a run resumed after the switch stays switched even if ``trainer.max_steps`` (and so
``switch_at_fraction``'s step) changes.

Stacked with ZPPO's replay, the teacher stage keeps replaying (the replayed problems are answered
by the teacher and their admission and graduation use the student's measured pass rate); BCQ and
NCQ prompts, built from the student's own wrong rollouts, start with the student stage.

Logs ``train/kl_stage`` (0 before, 1 after) once per rollout, and a message at the switch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_zpd.loss_config import DIVERGENCES, ROLLOUT_TERMS, TEACHER_TERMS, LossConfig
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.plan import DataSource, RolloutHook, RolloutPlan

COEFFICIENTS = ("sft", *DIVERGENCES, *ROLLOUT_TERMS)
_SETTINGS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.name not in COEFFICIENTS)
StageName = Literal["before", "after"]


@dataclass(frozen=True)
class ScheduleStage:
    """The loss and the data of one stage.

    Args:
        loss: Coefficients of the stage's loss terms (``sft``, ``forward_kl``, ``reverse_kl``,
            ``jsd``, ``policy``, ``on_policy_distill``); terms not named are 0. The other
            :class:`~lit_zpd.module.LossConfig` settings (``jsd_beta``, ``temperature``,
            ``clip_low``, ``aggregation``, ...) may be named too; those not named keep the
            model's values.
        data_source: Who writes the responses: ``student``, ``teacher`` or ``reference``.
    """

    loss: dict[str, float | str]
    data_source: DataSource = "student"


class KLSchedule(Callback, RolloutHook):
    """Switch the loss terms and the data source from ``before`` to ``after`` at one step.

    Args:
        before: The first stage; default: forward KL on teacher samples.
        after: The second stage; default: reverse KL on student rollouts.
        switch_at_step: First optimizer step trained with ``after``.
        switch_at_fraction: The same as a fraction of ``trainer.max_steps`` (rounded half up); set
            exactly one of the two.

    Example::

        schedule = KLSchedule(
            before=ScheduleStage(loss={"forward_kl": 1.0}, data_source="teacher"),
            after=ScheduleStage(loss={"reverse_kl": 1.0}, data_source="student"),
            switch_at_fraction=0.5,
        )

    In YAML, under ``trainer.callbacks``::

        - class_path: lit_zpd.callbacks.kl_schedule.KLSchedule
          init_args:
            switch_at_fraction: 0.5
            before: {loss: {forward_kl: 1.0}, data_source: teacher}
            after: {loss: {reverse_kl: 1.0}, data_source: student}
    """

    def __init__(
        self,
        before: ScheduleStage = ScheduleStage(loss={"forward_kl": 1.0}, data_source="teacher"),
        after: ScheduleStage = ScheduleStage(loss={"reverse_kl": 1.0}, data_source="student"),
        switch_at_step: int | None = None,
        switch_at_fraction: float | None = None,
    ) -> None:
        if (switch_at_step is None) == (switch_at_fraction is None):
            raise ValueError("KLSchedule: set exactly one of switch_at_step and switch_at_fraction")
        if switch_at_step is not None and switch_at_step < 0:
            raise ValueError(f"KLSchedule: switch_at_step must be >= 0, got {switch_at_step}")
        if switch_at_fraction is not None and not 0 <= switch_at_fraction <= 1:
            raise ValueError(f"KLSchedule: switch_at_fraction must be in [0, 1], got {switch_at_fraction}")
        for name, stage in (("before", before), ("after", after)):
            _check_stage(name, stage)
        self.before = before
        self.after = after
        self.switch_at_step = switch_at_step
        self.switch_at_fraction = switch_at_fraction
        self.switched = False
        self.switched_at_step: int | None = None
        self._switch_step: int | None = None  # switch_step(trainer), fixed at setup

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            before=self.before, after=self.after,
            switch_at_step=self.switch_at_step, switch_at_fraction=self.switch_at_fraction,
        )

    def switch_step(self, trainer: pl.Trainer) -> int:
        """The first optimizer step of stage ``after``."""
        if self.switch_at_step is not None:
            return self.switch_at_step
        assert self.switch_at_fraction is not None
        if trainer.max_steps < 0:
            raise ValueError("KLSchedule: switch_at_fraction needs trainer.max_steps; or set switch_at_step")
        return math.floor(self.switch_at_fraction * trainer.max_steps + 0.5)

    def stage_at(self, step: int) -> StageName:
        """The stage that trains a rollout sampled by the weights after ``step`` optimizer steps."""
        if self._switch_step is None:
            raise RuntimeError("KLSchedule: stage_at is known once the trainer has run setup")
        return "after" if self.switched or step >= self._switch_step else "before"

    # ----------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name, s in (("before", self.before), ("after", self.after)):
            uses_teacher = s.data_source == "teacher" or any(k in TEACHER_TERMS and v > 0 for k, v in s.loss.items())
            if uses_teacher and getattr(pl_module, "teacher", None) is None:
                raise ValueError(
                    f"KLSchedule: {name} uses the teacher ({name}.loss / {name}.data_source): set model.teacher"
                )
        self._switch_step = self.switch_step(trainer)

    @override
    def rollout_controls(self) -> set[str]:
        return {"data_source", "loss"}

    @override
    def on_plan(self, ctx: RolloutContext, plan: RolloutPlan) -> None:
        name = self.stage_at(plan.policy_version)
        stage = self._stage(name)
        plan.data_source = stage.data_source
        plan.loss = stage_loss(ctx.loss, stage)
        plan.metrics["train/kl_stage"] = float(name == "after")
        if name == "after" and not self.switched:
            self.switched, self.switched_at_step = True, plan.policy_version
            rank_zero_info(
                f"KLSchedule: switched to stage 'after' at step {plan.policy_version}: loss {plan.loss.active}, "
                f"data_source {stage.data_source}"
            )

    # ----------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched, "switched_at_step": self.switched_at_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched = bool(state_dict.get("switched", False))
        at = state_dict.get("switched_at_step")
        self.switched_at_step = int(at) if at is not None else None

    # ----------------------------------------------------------------------------- internals

    def _stage(self, name: StageName) -> ScheduleStage:
        return self.before if name == "before" else self.after


def stage_loss(base: LossConfig, stage: ScheduleStage) -> LossConfig:
    """``base`` with the stage's coefficients (the others 0) and the settings it names."""
    return dataclasses.replace(base, **({name: 0.0 for name in COEFFICIENTS} | stage.loss))


def _check_stage(name: str, stage: ScheduleStage) -> None:
    unknown = sorted(set(stage.loss) - set(COEFFICIENTS) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"KLSchedule: {name}.loss has unknown keys {unknown}; known: {[*COEFFICIENTS, *_SETTINGS]}")
    if stage.data_source not in get_args(DataSource):
        raise ValueError(
            f"KLSchedule: {name}.data_source must be one of {get_args(DataSource)}, got {stage.data_source!r}"
        )
    try:
        loss = stage_loss(LossConfig(sft=1.0), stage)
    except ValueError as err:
        raise ValueError(f"KLSchedule: {name}.loss is invalid: {err}") from err
    rollout_terms = sorted(loss.active.keys() & set(ROLLOUT_TERMS))
    if rollout_terms and stage.data_source != "student":
        raise ValueError(f"KLSchedule: {name}.loss uses {rollout_terms}, which need {name}.data_source: student")
