"""StepProgressBar: the console bar of a run, in optimizer steps.

Lightning's bar counts the batches of an epoch; here a run is ``trainer.max_steps`` optimizer
steps over an endless stream of rollouts, and one batch is not always one step
(``accumulate_grad_batches`` makes several batches one; the PPO minibatches of a rollout are a
step each). The training bar
reads ``step: 40%|████      | 40/100`` and counts ``trainer.global_step``, so a run resumed at
step 40 starts at 40/100. Next to it: ``loss`` (``train/loss``), ``reward`` (the mean reward of
the latest on-policy rollout, ``rollout/reward_mean``; off-policy rows are the teacher's or the
reference solutions) and ``eval_acc`` (greedy accuracy of the last evaluation,
``eval/greedy/all``) once logged, and any metric logged with ``prog_bar=True``. The evaluation bar
reads ``eval: 12`` (batches) while the evaluation set's size is unknown, and what a callback
prints before the first bar exists (the start report) is printed, where Lightning's bar drops it.

The CLI adds it unless ``trainer.callbacks`` has a progress bar of its own or
``--trainer.enable_progress_bar=false``.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from typing_extensions import override

# Logged metric -> its name on the bar.
KEY_METRICS: dict[str, str] = {"train/loss": "loss", "rollout/reward_mean": "reward", "eval/greedy/all": "eval_acc"}


class StepProgressBar(TQDMProgressBar):
    """A :class:`~lightning.pytorch.callbacks.TQDMProgressBar` whose training bar counts optimizer
    steps up to ``trainer.max_steps`` and shows the run's key metrics.

    Args:
        refresh_rate: Redraw the training bar every this many steps (0 hides the bars).
        process_position: Offset of the bars, in lines.
        leave: Keep the finished bar of each epoch on the console.

    Example::

        trainer = Trainer(max_steps=100, callbacks=[StepProgressBar()])
    """

    _student_reward: Any = None  # rollout/reward_mean of the latest on-policy step

    # The bar when the total is unknown (no max_steps, an unsized evaluation set): no "5/?".
    UNSIZED_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"

    @property
    @override
    def train_description(self) -> str:
        return "step"

    @property
    @override
    def validation_description(self) -> str:
        return "eval"

    @override
    def init_train_tqdm(self) -> Tqdm:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        return Tqdm(
            desc=self.train_description,
            total=total,
            initial=self.trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT if total else self.UNSIZED_FORMAT,
        )

    @override
    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        total = convert_inf(self.total_val_batches)
        return Tqdm(
            desc=self.validation_description,
            total=total,
            position=2 * self.process_position + has_main_bar,
            disable=self.is_disabled,
            leave=not has_main_bar,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT if total else self.UNSIZED_FORMAT,
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self._train_progress_bar, trainer.global_step
        if bar is None or bar.disable or not self._should_update(step, bar.total):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws the bar

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.val_progress_bar
        bar.reset()
        bar.total = convert_inf(self.total_val_batches_current_dataloader)
        bar.set_description_str(self.sanity_check_description if trainer.sanity_checking else self.validation_description)

    @override
    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Through the active bar, or plainly when none is (Lightning's would drop the text: the
        start report, printed before the training bar exists)."""
        bars = (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar, self._predict_progress_bar)
        if any(bar is not None and not bar.disable for bar in bars):
            super().print(*args, sep=sep, **kwargs)
        else:
            print(*args, sep=sep, **kwargs)

    @override
    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        """The key metrics that have been logged, then the other ``prog_bar=True`` ones; no ``v_num``."""
        logged = dict(trainer.callback_metrics)
        if float(logged.get("rollout/on_policy", 0.0)) > 0:
            self._student_reward = logged.get("rollout/reward_mean")
        logged["rollout/reward_mean"] = self._student_reward
        shown = {name: logged[key] for key, name in KEY_METRICS.items() if logged.get(key) is not None}
        shown |= {key: value for key, value in trainer.progress_bar_metrics.items() if key not in KEY_METRICS}
        return {name: _compact(value) for name, value in shown.items()}


def _compact(value: Any) -> Any:
    """Three significant digits for a number (``0.0123``, ``1.5e-05``), anything else as it is."""
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return value
