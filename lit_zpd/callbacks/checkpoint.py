"""RunCheckpoint: Lightning's ModelCheckpoint, with the end of every run saved.

Lightning's callback writes ``last.ckpt`` every ``every_n_train_steps`` and, at the end of
training, only if it never wrote one: a run that ends between two intervals (``max_steps`` not a
multiple of it, a token budget, a stop after a non-finite step) kept its final weights in no
checkpoint. This one also saves at the end whenever the final step is not saved yet. The CLI
configures it under ``checkpoint`` with ``save_last: true`` and ``save_on_exception: true``, so
an exception, or SIGTERM (how schedulers stop jobs: Lightning ends the step under way, then raises
``SIGTERMException``), leaves the last completed step in ``last.ckpt``; ``lit-zpd`` then exits
with status 143 (128 + SIGTERM).
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that always saves the final step.

    Takes ModelCheckpoint's arguments.

    Example::

        Trainer(callbacks=[RunCheckpoint(every_n_train_steps=50, save_last=True)])
    """

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not trainer.is_global_zero:
            return
        if isinstance(exception, SIGTERMException):
            what = f"stopped by SIGTERM after step {trainer.global_step}"
        else:
            what = f"the run failed after step {trainer.global_step} with {type(exception).__name__}"
        where = self.last_model_path or self.best_model_path
        saved = f"saved to {where}; resume with --ckpt_path {where}" if where else "nothing was saved (no step was completed)"
        print(f"lit-zpd: {what}; {saved}", file=sys.stderr)
