"""StudentTokenBudget: runs stop at a student rollout token budget."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch import Callback, Trainer

from lit_zpd.callbacks.budget import StudentTokenBudget
from lit_zpd.module import DistillModule, LossConfig
from tests.test_rollout import make_data, make_trainer


class TokenLog(Callback):
    def __init__(self) -> None:
        self.spent: list[int] = []
        self.minibatch: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.spent.append(trainer.datamodule.counters.student_tokens)
        self.minibatch.append(batch.minibatch_index)


@pytest.mark.parametrize("minibatches", [1, 2])
def test_stops_at_the_first_rollout_boundary_past_the_budget(tiny_student: str, minibatches: int) -> None:
    def run(callbacks: list[Callback]) -> TokenLog:
        log = TokenLog()
        module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0))
        make_trainer(8, [log, *callbacks]).fit(module, datamodule=make_data(ppo_minibatches=minibatches))
        return log

    free = run([])
    assert len(free.spent) == 8
    budget = free.spent[2] - 1  # reached during the rollout served at step 2
    capped = run([StudentTokenBudget(budget)])
    stop = 2 if minibatches == 1 else 3  # with minibatches, the rollout's last minibatch still trains
    assert capped.spent == free.spent[: stop + 1]
    assert capped.minibatch[-1] == minibatches - 1
    assert capped.spent[-1 - minibatches] < budget <= capped.spent[-1]  # not reached a rollout earlier


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_student_tokens must be >= 1"):
        StudentTokenBudget(0)
