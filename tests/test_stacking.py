"""The pedagogical callbacks stacked: each acts as documented on rows of every kind, together.

What each callback does to rows of each kind (plain / bcq / ncq / replayed) is documented in
docs/ARCHITECTURE.md; every test here runs a real Trainer with two (or three) of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_zpd.callbacks.beta_kernel import BetaKernelWeighting
from lit_zpd.callbacks.kl_schedule import KLSchedule, ScheduleStage
from lit_zpd.callbacks.replay_graduation import ReplayGraduationCallback
from lit_zpd.callbacks.rollout_logging import RolloutLogger
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.batch import RolloutBatch
from lit_zpd.rollout.datamodule import RolloutDataModule
from tests.test_rollout import OddLengthVerifier, make_data

TEACHER_FIRST = dict(
    before=ScheduleStage(loss={"forward_kl": 1.0}, data_source="teacher"),
    after=ScheduleStage(loss={"policy": 1.0}, data_source="student"),
    switch_at_step=2,
)


class Batches(Callback):
    def __init__(self) -> None:
        self.batches: list[RolloutBatch] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(copy.deepcopy(batch))


def fit(student: str, teacher: str, callbacks: list[Callback], steps: int = 4, **data: Any) -> tuple[Batches, RolloutDataModule]:
    log = Batches()
    module = DistillModule(student=student, teacher=teacher, loss=LossConfig(policy=1.0))
    datamodule = make_data(verifier=OddLengthVerifier(), samples_per_prompt=4, prompts_per_step=4, **data)
    trainer = Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[*callbacks, log],
    )
    trainer.fit(module, datamodule=datamodule)
    return log, datamodule


def replayed_rows(batch: RolloutBatch, data: RolloutDataModule) -> list[int]:
    new = {p.problem_id for p in data.pipeline.sampler.draw(batch.rollout_index)[0]}
    return [i for i, (pid, kind) in enumerate(zip(batch.problem_ids, batch.kinds)) if kind == "plain" and pid not in new]


def test_replay_and_beta_kernel(tiny_student: str, tiny_teacher: str) -> None:
    """Reformulated rows are weighted by their own group's pass rate, not zeroed by the plain one."""
    replay, kernel = ReplayGraduationCallback(augment_ratio=1.0, teacher_samples=2), BetaKernelWeighting()
    log, data = fit(tiny_student, tiny_teacher, [replay, kernel])
    assert replay.admissions > 0 and any(replayed_rows(b, data) for b in log.batches)
    reformulated = 0
    for batch in log.batches:
        p = batch.extras["student_pass_rate"]
        assert torch.equal(p, batch.pass_rate)  # on-policy: every row's own group
        inside = (p > 0) & (p < 1)
        assert torch.equal(batch.weights > 0, inside)
        kinds = torch.tensor([k != "plain" for k in batch.kinds])
        reformulated += int((kinds & inside).sum())
        assert (batch.weights[kinds & inside] > 0).all()
    assert reformulated > 0  # BCQ/NCQ rows with a reward spread got a weight


def test_replay_keeps_working_behind_a_teacher_first_schedule(tiny_student: str, tiny_teacher: str) -> None:
    replay, schedule = ReplayGraduationCallback(augment_ratio=1.0, teacher_samples=2), KLSchedule(**TEACHER_FIRST)
    log, data = fit(tiny_student, tiny_teacher, [replay, schedule])
    teacher_stage, student_stage = log.batches[:2], log.batches[2:]
    assert all(b.source == "teacher" and b.loss.active == {"forward_kl": 1.0} for b in teacher_stage)
    assert all(b.source == "student" and b.loss.active == {"policy": 1.0} for b in student_stage)
    # In the teacher stage: admissions from the student's measured pass rates, and replay rows...
    assert len(data.pass_rates) >= 8 and replay.admissions > 0
    assert replayed_rows(teacher_stage[1], data)
    # ...but no BCQ/NCQ, which are built from the student's own wrong rollouts.
    assert all(set(b.kinds) == {"plain"} for b in teacher_stage)
    assert any(set(b.kinds) > {"plain"} for b in student_stage)


def test_beta_kernel_and_schedule(tiny_student: str, tiny_teacher: str) -> None:
    schedule, kernel = KLSchedule(**TEACHER_FIRST), BetaKernelWeighting(alpha=0.0, beta=0.0)  # the hard filter
    log, data = fit(tiny_student, tiny_teacher, [schedule, kernel])
    for batch in log.batches:
        p = batch.extras["student_pass_rate"]
        if batch.source == "teacher":  # the student's measured pass rate of the problem, not the teacher's rewards
            assert torch.equal(p, torch.tensor([data.pass_rates.get(pid) for pid in batch.problem_ids]))
        else:
            assert torch.equal(p, batch.pass_rate)
        assert torch.equal(batch.weights > 0, (p > 0) & (p < 1))
    assert {b.source for b in log.batches} == {"teacher", "student"}


def test_order_of_callbacks_does_not_change_the_run(tiny_student: str, tiny_teacher: str) -> None:
    def run(order: list[int]) -> list[RolloutBatch]:
        made = [ReplayGraduationCallback(augment_ratio=1.0, teacher_samples=2), BetaKernelWeighting(), KLSchedule(**TEACHER_FIRST)]
        return fit(tiny_student, tiny_teacher, [made[i] for i in order])[0].batches

    for a, b in zip(run([0, 1, 2]), run([2, 1, 0]), strict=True):
        assert a.problem_ids == b.problem_ids and a.kinds == b.kinds
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.weights, b.weights)


def test_per_rollout_counters_are_logged_once_per_rollout(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    replay = ReplayGraduationCallback(augment_ratio=0.5, teacher_samples=2)
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(policy=1.0))
    trainer = Trainer(
        max_steps=8, logger=TensorBoardLogger(tmp_path, name="run"), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[replay, RolloutLogger(every_n_steps=1)],
    )
    trainer.fit(module, datamodule=make_data(ppo_minibatches=4, verifier=OddLengthVerifier()))
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    admitted = events.Scalars("replay/step_admitted")
    assert [e.step for e in admitted] == [0, 4]  # 2 rollouts of 4 minibatches: once each
    assert sum(e.value for e in admitted) == replay.admissions
    assert [e.step for e in events.Scalars("rollout/student_tokens_total")] == [0, 4]
    assert len(events.Scalars("rollout/reward_mean")) == 8  # per-step row statistics stay per step
