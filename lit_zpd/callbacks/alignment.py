"""GradientAlignmentProbe: the gradient alignment diagnostic, measured during training.

Every ``every_n_steps`` optimizer steps (and before the first) it runs
:func:`~lit_zpd.diagnostics.alignment.measure_alignment` on a fixed probe set, the first
``num_problems`` problems of ``split`` taken round-robin over skills, with the current student,
and logs per signal and per split (``correct``, ``incorrect``, ``all``)
``diagnostics/alignment/<signal>/<split>`` (mean cosine over questions) and
``diagnostics/teacher_advantage/<signal>/<split>``, and the image
``diagnostics/alignment_by_depth``. The probe's student samples are a measurement, not training:
they do not count in ``rollout/student_tokens_total``.

A signal's ``teacher`` is ``model.teacher`` (the run's teacher), ``self_live`` (the student
itself, with ``reveal_ratio`` a privileged self-teacher) or a model directory. Only rank 0
measures (the diagnostic calls no collective) and broadcasts its scalars, so every rank keeps the
same history of summaries in ``state_dict``, as plain data.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from typing_extensions import override

from lit_zpd.assets import resolve
from lit_zpd.diagnostics.alignment import AlignmentSettings, SignalConfig, measure_alignment
from lit_zpd.diagnostics.diagnose import spread_over_skills
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.tasks.problem import SPLITS, Split
from lit_zpd.teacher import load_teacher

RUN_TEACHER = "model.teacher"


class GradientAlignmentProbe(Callback):
    """Measure how well distillation signals align with the ideal gradient while training (see
    the module doc).

    Args:
        every_n_steps: Optimizer steps between measurements.
        num_problems: Problems of the fixed probe set.
        split: Where the probe set comes from.
        signals: The signals scored; the run's teacher with reverse KL if ``None``.
        settings: The diagnostic's settings; small ones (2 rollouts, K 4, M 4, 4,000 samples) if
            ``None``.

    Example::

        trainer = Trainer(callbacks=[GradientAlignmentProbe(every_n_steps=50, num_problems=8)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_problems: int = 8,
        split: Split = "validation",
        signals: list[SignalConfig] | None = None,
        settings: AlignmentSettings | None = None,
    ) -> None:
        name = type(self).__name__
        if every_n_steps < 1:
            raise ValueError(f"{name}.every_n_steps must be >= 1, got {every_n_steps}")
        if num_problems < 1:
            raise ValueError(f"{name}.num_problems must be >= 1, got {num_problems}")
        if split not in SPLITS:
            raise ValueError(f"{name}.split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.every_n_steps = every_n_steps
        self.num_problems = num_problems
        self.split: Split = split
        self.signals = signals or [SignalConfig("teacher", teacher=RUN_TEACHER)]
        self.settings = settings or AlignmentSettings(
            rollouts_per_problem=2, top_k=4, continuations=4, budget=4000, token_view_rollouts=0, bootstrap=200,
            sampling=SamplingConfig(temperature=1.0, max_new_tokens=48),
        )
        self.history: list[dict[str, Any]] = []  # per measurement: step and the logged scalars
        self._teachers: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, signals=[s.name for s in self.signals])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(s.teacher == RUN_TEACHER for s in self.signals) and getattr(pl_module, "teacher", None) is None:
            raise ValueError(f"{type(self).__name__}: a signal uses model.teacher, and the run has none")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history:
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation several batches end at one step.
        measured = self.history and self.history[-1]["step"] == trainer.global_step
        if trainer.global_step % self.every_n_steps == 0 and not measured:
            self._measure(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def _measure(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Rank 0 measures; every rank receives its scalars (one broadcast), so the history is the
        same everywhere."""
        report = None
        metrics: dict[str, float] | None = None
        if trainer.is_global_zero:
            ctx = trainer.datamodule.context
            problems = spread_over_skills(ctx.problems(self.split), self.num_problems)
            report = measure_alignment(ctx, problems, [(s, self._teacher(s.teacher, pl_module)) for s in self.signals], self.settings)
            metrics = {}
            for name, splits in report.summary().items():
                for split, row in splits.items():  # a split without a measured node is left out
                    if not math.isnan(row["alignment"]):
                        metrics[f"diagnostics/alignment/{name}/{split}"] = row["alignment"]
                        metrics[f"diagnostics/teacher_advantage/{name}/{split}"] = row["teacher_advantage"]
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None and report is not None:
            from lit_zpd.figures import alignment_by_depth  # matplotlib is loaded only by runs that draw

            tensorboard.experiment.add_figure("diagnostics/alignment_by_depth", alignment_by_depth(report.by_depth()), trainer.global_step)

    def _teacher(self, spec: str, pl_module: Any) -> Any:
        if spec == RUN_TEACHER:
            return pl_module.teacher
        if spec not in self._teachers:
            teacher = load_teacher(resolve(spec), pl_module.student, pl_module.tokenizer)
            self._teachers[spec] = teacher.to(pl_module.device) if isinstance(teacher, nn.Module) else teacher
        return self._teachers[spec]
