"""RolloutLogger: what the rollouts look like, in TensorBoard.

Every optimizer step it logs, over the rows of the step's batch: ``rollout/reward_mean``,
``rollout/response_length``, ``rollout/pass_rate_mean``, the shares of rows whose group pass rate
is 0 or 1, ``rollout/policy_lag`` and ``rollout/on_policy`` (averaged over ranks). Once per
rollout (its first minibatch), straight to the loggers so that a value is written once and not
repeated on the rollout's other minibatch steps: the rollout's counters (hooks' ``replay/*``,
``rollout/student_tokens_total``, ``rollout/verifier_errors_total``,
``rollout/weight_sync_seconds``, ...), identical on every rank. Every ``every_n_steps`` steps, to
TensorBoard: histograms of pass rates, response lengths and sample weights (and the hooks'), and
decoded rollouts with their prompts, one row of every prompt kind first.

The CLI adds it by default (key ``rollout_log``; ``rollout_log: null`` drops it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_zpd.rollout.batch import RolloutBatch


class RolloutLogger(Callback):
    """Log rollout statistics, histograms and decoded samples.

    Args:
        every_n_steps: Period of histograms and decoded samples.
        num_samples: Decoded rollouts written each time.

    Example::

        trainer = Trainer(callbacks=[RolloutLogger(every_n_steps=50, num_samples=4)])
    """

    def __init__(self, every_n_steps: int = 50, num_samples: int = 4) -> None:
        if every_n_steps < 1:
            raise ValueError(f"RolloutLogger.every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 0:
            raise ValueError(f"RolloutLogger.num_samples must be >= 0, got {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, RolloutBatch):
            return
        lengths = batch.response_mask.sum(-1).float()
        pass_rate = batch.pass_rate
        pl_module.log_dict(
            {
                "rollout/reward_mean": batch.rewards.mean(),
                "rollout/response_length": lengths.mean(),
                "rollout/pass_rate_mean": pass_rate.mean(),
                "rollout/pass_rate_zero_fraction": (pass_rate == 0).float().mean(),
                "rollout/pass_rate_one_fraction": (pass_rate == 1).float().mean(),
                "rollout/policy_lag": float(trainer.global_step - batch.policy_version),
                "rollout/on_policy": float(batch.source == "student"),
            },
            batch_size=batch.size,
            sync_dist=True,
        )
        if batch.first_minibatch and batch.metrics:
            for logger in trainer.loggers:
                logger.log_metrics(batch.metrics, step=trainer.global_step)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or trainer.global_step % self.every_n_steps:
            return
        writer, step = tensorboard.experiment, trainer.global_step
        writer.add_histogram("rollout/pass_rate", pass_rate, step)
        writer.add_histogram("rollout/response_length", lengths, step)
        writer.add_histogram("train/sample_weight", batch.weights, step)
        if batch.first_minibatch:
            for name, values in batch.histograms.items():
                writer.add_histogram(name, values, step)
        writer.add_text(f"rollout/samples_{batch.source}", self.samples_text(batch), step)

    def samples_text(self, batch: RolloutBatch) -> str:
        """Markdown of up to ``num_samples`` rows, one row of every kind (plain, bcq, ncq) first."""
        kinds = batch.kinds
        first = [kinds.index(k) for k in dict.fromkeys(kinds)]
        rows = (first + [i for i in range(batch.size) if i not in first])[: self.num_samples]
        return "\n\n".join(
            f"**{batch.problem_ids[i]}** ({kinds[i]}, reward {batch.rewards[i]:.0f})\n\n"
            f"prompt:\n```\n{batch.prompts[i]}\n```\ncompletion:\n```\n{batch.completions[i]}\n```"
            for i in rows
        )
