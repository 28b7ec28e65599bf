"""Two-stage divergence schedule: one loss and data source before a step, another after it.

PACED (seed 003) distils best with forward KL(p_T || p_S) on teacher or reference responses
first (mode coverage) and reverse KL(p_S || p_T) on the student's own rollouts after
(consolidation), switching at 50% of training. :class:`KLSchedule` implements any such pair of
:class:`ScheduleStage` objects.

What it changes (documented module and data settings, nothing else):

- ``pl_module.loss_config``: a new :class:`~lit_zpd.module.LossConfig` whose coefficients are the
  stage's (coefficients the stage does not name are 0); settings the stage names (``jsd_beta``,
  ``temperature``, ...) are replaced, the others keep the model's YAML values.
- ``trainer.datamodule.data_source`` to the stage's source, and ``trainer.datamodule.lmbda`` to
  ``None`` (no GKD mixing while a schedule runs).

When: the batch of optimizer step ``t`` is rolled out in ``on_before_batch_transfer``, before
``on_train_batch_start``, so the stage of step ``t`` is applied before that rollout: in
``setup`` and ``on_train_start`` (the first step, and after a resume) and in
``on_train_batch_end`` of step ``t - 1``, so the data module's plan of step ``t`` already has the
new source; the ``on_rollout_plan`` hook applies it again and rewrites ``plan.source`` (for
rollouts requested outside that order). Stage ``after`` trains every batch whose
``policy_version`` (optimizer steps taken) is at least the switch step, the batch of the switch
step included. With ``data.ppo_minibatches`` the stage changes only between rollouts, so that the
minibatches of one rollout keep the loss of their data. The switch is one-way and saved in the
checkpoint: a run resumed after the switch stays switched even if ``trainer.max_steps`` (and so
``switch_at_fraction``'s step) changes.

Logs ``train/kl_stage`` (0 before, 1 after) every step and, at the switch, a text note
``train/kl_stage`` in TensorBoard.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_zpd.module import DIVERGENCES, ROLLOUT_TERMS, TEACHER_TERMS, LossConfig
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
        self.active: StageName = "before"

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

    def stage_at(self, trainer: pl.Trainer, step: int) -> StageName:
        """The stage that trains optimizer step ``step``."""
        return "after" if self.switched or step >= self.switch_step(trainer) else "before"

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
        self._apply(trainer, self.stage_at(trainer, trainer.global_step), trainer.global_step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, self.stage_at(trainer, trainer.global_step), trainer.global_step)

    @override
    def on_rollout_plan(self, trainer: Any, plan: RolloutPlan) -> None:
        name = self.stage_at(trainer, plan.policy_version)
        self._apply(trainer, name, plan.policy_version)
        plan.source = self._stage(name).data_source

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/kl_stage", float(self.active == "after"), batch_size=batch["input_ids"].shape[0])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not batch.get("last_minibatch", True):
            return  # the next minibatch is of the same rollout: its loss must stay that of its data
        self._apply(trainer, self.stage_at(trainer, trainer.global_step), trainer.global_step)

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

    def _apply(self, trainer: Any, name: StageName, step: int) -> None:
        stage = self._stage(name)
        module, data = trainer.lightning_module, trainer.datamodule
        loss = stage_loss(module.loss_config, stage)
        if module.loss_config != loss:
            module.loss_config = loss
        data.data_source = stage.data_source
        data.lmbda = None
        self.active = name
        if name == "after" and not self.switched:
            self.switched, self.switched_at_step = True, step
            note = (
                f"KLSchedule: switched to stage 'after' at step {step}: loss {loss.active}, "
                f"data_source {stage.data_source}"
            )
            rank_zero_info(note)
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_text("train/kl_stage", note, step)


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
