"""Stop training once the student has sampled a given number of rollout tokens."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class StudentTokenBudget(Callback):
    """End ``fit`` when the student rollout tokens reach ``max_student_tokens``.

    Methods that compare at "the same budget" spend it differently: ZPPO samples replayed and
    reformulated prompts besides the new ones, PACED samples the student to estimate pass rates,
    GKD with ``lmbda < 1`` samples the student on only part of its steps. The rollout pipeline
    counts every student token sampled for training on every rank (``data.counters``, summed over
    the ranks once per rollout, saved in checkpoints and logged as
    ``rollout/student_tokens_total``); this callback stops the run after the first optimizer step
    at which that count reaches the budget, and with ``data.ppo_minibatches > 1`` only after the
    last minibatch of a rollout, so no sampled rollout is left half-trained. Ranks agree on the
    stop (``reduce_boolean_decision``). Keep ``trainer.max_steps`` as an upper bound (or -1).

    Args:
        max_student_tokens: The budget; >= 1.

    Example::

        trainer = Trainer(max_steps=-1, callbacks=[StudentTokenBudget(600_000)])
    """

    def __init__(self, max_student_tokens: int) -> None:
        if max_student_tokens < 1:
            raise ValueError(f"StudentTokenBudget.max_student_tokens must be >= 1, got {max_student_tokens}")
        self.max_student_tokens = max_student_tokens

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counters = getattr(trainer.datamodule, "counters", None)
        if counters is None:
            raise TypeError("StudentTokenBudget needs a data module that counts student tokens (RolloutDataModule)")
        spent = counters.student_tokens >= self.max_student_tokens and batch.last_minibatch
        if trainer.strategy.reduce_boolean_decision(spent, all=False):
            trainer.should_stop = True
