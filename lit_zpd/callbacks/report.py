"""AccuracyReport: the student's (and teacher's) accuracy before training, the student's after.

At the start of ``fit`` it evaluates the student and the teacher on a split (greedy accuracy,
mean accuracy over ``data.eval_samples`` samples and the share of problems with a pass rate
strictly inside (0, 1), per skill) and prints them side by side; at the end it evaluates the
student again and adds forgetting: of the problems the student solved greedily at the start, the
share it now fails. Both are logged as ``eval/start/<model>/...`` and ``eval/end/student/...``.
A resumed run keeps the start report of its first start (it is in the checkpoint). The
evaluation is shared out over the ranks.

The CLI adds it by default (key ``report``; ``report: null`` drops it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_zpd.report import accuracy_table, forgetting, solved, summarize
from lit_zpd.tasks.problem import SPLITS, Split


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
        self._log(trainer, "start", self.start)
        pl_module.print(accuracy_table({f"{n} (start)": r for n, r in self.start.items()}))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = trainer.datamodule.evaluate(pl_module.student, self.split)
        self.end = {"student": summarize(results) | forgetting(self.start_solved, results)}
        self._log(trainer, "end", self.end)
        columns = {f"{n} (start)": r for n, r in self.start.items()} | {"student (end)": self.end["student"]}
        pl_module.print(accuracy_table(columns))

    def _log(self, trainer: pl.Trainer, when: str, report: dict[str, dict[str, float]]) -> None:
        metrics = {f"eval/{when}/{model}/{key}": value for model, r in report.items() for key, value in r.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "start_solved": list(self.start_solved)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = {name: dict(r) for name, r in state_dict.get("start", {}).items()}
        self.start_solved = list(state_dict.get("start_solved", []))
