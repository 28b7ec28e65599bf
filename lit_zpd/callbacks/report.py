"""AccuracyReport: the student's (and teacher's) accuracy before training, the student's after.

At the start of ``fit`` it evaluates the student and the teacher on a split (greedy accuracy,
mean accuracy over ``data.eval_samples`` samples and the share of problems with a pass rate
strictly inside (0, 1), per skill) and prints them side by side; at the end it evaluates the
student again and adds forgetting: of the problems the student solved greedily at the start, the
share it now fails.

What it logs:

* ``eval/report`` (TensorBoard text): the table as markdown, once at the start (the start
  columns) and once at the end (student and teacher at the start, student at the end with its
  forgetting);
* ``eval/accuracy_by_skill`` (TensorBoard image, at the end): per skill and overall, grouped bars
  of the greedy accuracy of the student at the start, the teacher at the start and the student at
  the end;
* three headline scalars at the end, to every logger (CSV too): ``eval/end/student/greedy/all``,
  ``eval/end/student/mean_at_k/all`` (when ``data.eval_samples`` > 0) and
  ``eval/end/student/forgotten/all``.

Loggers other than TensorBoard get the headline scalars only; every number stays in the
callback's ``start`` and ``end`` (and in the printed tables). A resumed run keeps the start report of its first start (it is in the
checkpoint). The evaluation is shared out over the ranks.

The CLI adds it by default (key ``report``; ``report: null`` drops it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_zpd.report import accuracy_table, forgetting, solved, summarize
from lit_zpd.tasks.problem import SPLITS, Split

HEADLINE = ("greedy/all", "mean_at_k/all", "forgotten/all")
"""The keys of the end report logged as scalars ``eval/end/student/<key>``."""


class AccuracyReport(Callback):
    """Evaluate the student (and teacher) before ``fit`` and the student after it.

    Args:
        split: The split evaluated.
        teacher: Evaluate the teacher at the start too (not when it is the live student).

    Example::

        trainer = Trainer(callbacks=[AccuracyReport(split="validation")])
    """

    def __init__(self, split: Split = "validation", teacher: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"AccuracyReport.split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.teacher = teacher
        self.start: dict[str, dict[str, float]] = {}
        self.end: dict[str, dict[str, float]] = {}
        self.start_solved: list[str] = []  # problems the student solved greedily at the start

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start:  # a resumed run keeps its real start
            return
        data = trainer.datamodule
        models = {"student": pl_module.student}
        if self.teacher and pl_module.teacher is not None and pl_module.teacher is not pl_module.student:
            models["teacher"] = pl_module.teacher
        results = {name: data.evaluate(model, self.split) for name, model in models.items()}
        self.start = {name: summarize(r) for name, r in results.items()}
        self.start_solved = solved(results["student"])
        columns = {f"{n} (start)": r for n, r in self.start.items()}
        self._log_report(trainer, columns)
        pl_module.print(accuracy_table(columns))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = trainer.datamodule.evaluate(pl_module.student, self.split)
        self.end = {"student": summarize(results) | forgetting(self.start_solved, results)}
        headline = {f"eval/end/student/{key}": self.end["student"][key] for key in HEADLINE if key in self.end["student"]}
        for logger in trainer.loggers:
            logger.log_metrics(headline, step=trainer.global_step)
        columns = {f"{n} (start)": r for n, r in self.start.items()} | {"student (end)": self.end["student"]}
        self._log_report(trainer, columns, figure=True)
        pl_module.print(accuracy_table(columns))

    def _log_report(self, trainer: pl.Trainer, columns: dict[str, dict[str, float]], figure: bool = False) -> None:
        """The table as TensorBoard text ``eval/report`` and, with ``figure``, the bars
        ``eval/accuracy_by_skill``; nothing without a TensorBoard logger."""
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or not trainer.is_global_zero:
            return
        tensorboard.experiment.add_text("eval/report", accuracy_table(columns, markdown=True), trainer.global_step)
        if figure:
            from lit_zpd.figures import accuracy_by_skill  # matplotlib is loaded only by runs that draw

            tensorboard.experiment.add_figure("eval/accuracy_by_skill", accuracy_by_skill(columns), trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "start_solved": list(self.start_solved)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = {name: dict(r) for name, r in state_dict.get("start", {}).items()}
        self.start_solved = list(state_dict.get("start_solved", []))
