"""PACED: the Beta-kernel pass-rate weighting and the two-stage KL schedule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_zpd.callbacks.beta_kernel import BetaKernelWeighting
from lit_zpd.callbacks.kl_schedule import KLSchedule, ScheduleStage
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.pass_rates import PassRateSettings, PassRateTracker
from lit_zpd.rollout.pipeline import RolloutPipeline
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup, RolloutPlan
from lit_zpd.rollout.sampler import ProblemSampler
from lit_zpd.tasks.problem import Problem
from tests.conftest import ScriptedEngine
from tests.test_rollout import make_data, make_trainer

FKL_ON_REFERENCE = ScheduleStage(loss={"forward_kl": 1.0}, data_source="reference")
RKL_ON_STUDENT = ScheduleStage(loss={"reverse_kl": 1.0}, data_source="student")
MakeContext = Callable[..., RolloutContext]


def group(pid: str, rewards: list[float], kind: str = "plain") -> RolloutGroup:
    spec = PromptSpec(Problem(pid, f"{pid}?", "1"), kind=kind)  # type: ignore[arg-type]
    return RolloutGroup(spec=spec, token_ids=[[1]] * len(rewards), texts=[""] * len(rewards), rewards=rewards)


def on_policy(hook: BetaKernelWeighting, ctx: RolloutContext, groups: list[RolloutGroup]) -> list[list[float]]:
    plan = RolloutPlan(rollout_index=0, policy_version=0, data_source="student", prompts=[g.spec for g in groups])
    return hook.on_weight(ctx, plan, groups, [g.summary(0, True) for g in groups])


# ----------------------------------------------------------------------------- weights


def test_kernel_on_hand_values() -> None:
    hook = BetaKernelWeighting(alpha=2.0, beta=1.0, skip_extremes=False)
    assert hook.kernel(0.5) == pytest.approx(0.125)
    assert hook.kernel(0.25) == pytest.approx(0.25**2 * 0.75)
    assert BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=False).kernel(0.0) == 1.0
    assert BetaKernelWeighting(alpha=0.0, beta=1.0, skip_extremes=False).kernel(0.0) == 1.0
    assert BetaKernelWeighting(alpha=0.0, beta=1.0, skip_extremes=True).kernel(0.0) == 0.0


def test_weights_follow_p_one_minus_p_with_mean_one(make_context: MakeContext) -> None:
    groups = [group("a", [1, 0, 0, 0]), group("b", [1, 1, 0, 0]), group("c", [1, 1, 1, 0])]
    weights = on_policy(BetaKernelWeighting(alpha=1.0, beta=1.0), make_context(), groups)
    raw = [0.1875, 0.25, 0.1875]
    scale = 12 / (4 * sum(raw))
    for row, r in zip(weights, raw):
        assert row == pytest.approx([r * scale] * 4)
    flat = torch.tensor([w for row in weights for w in row])
    assert flat.mean().item() == pytest.approx(1.0)


def test_extremes_are_skipped_and_all_zero_stays_zero(make_context: MakeContext) -> None:
    groups = [group("zero", [0, 0]), group("half", [1, 0]), group("one", [1, 1])]
    weights = on_policy(BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=True), make_context(), groups)
    assert weights == [[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]]  # PACED's hard filter
    weights = on_policy(BetaKernelWeighting(), make_context(), [group("zero", [0, 0]), group("one", [1, 1])])
    assert weights == [[0.0, 0.0], [0.0, 0.0]]


def test_reformulated_groups_use_their_own_pass_rate(make_context: MakeContext) -> None:
    """A BCQ/NCQ group is the student's answers to that prompt: its own p sets its weight, so the
    reformulations of a p = 0 problem (the ones ZPPO builds) are not all weighted 0."""
    groups = [group("a", [0, 0]), group("a", [1, 0], kind="bcq"), group("a", [1, 1, 1, 0], kind="ncq")]
    weights = on_policy(BetaKernelWeighting(skip_extremes=True), make_context(), groups)
    assert weights[0] == [0.0, 0.0]
    assert weights[1][0] > 0 and weights[2][0] > 0
    assert weights[1][0] / weights[2][0] == pytest.approx(0.25 / 0.1875)


@pytest.mark.parametrize("key", ["alpha", "beta"])
def test_negative_exponent_names_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        BetaKernelWeighting(**{key: -0.5})
    with pytest.raises(ValueError, match="data.pass_rate.rollouts"):
        PassRateSettings(rollouts=0)


def test_uniform_kernel_equals_unweighted_training(tiny_student: str) -> None:
    hook = BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=False)
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(sft=1.0))
    data = make_data(samples_per_prompt=4)
    trainer = make_trainer(1, [hook])
    trainer.fit(module, datamodule=data)
    weighted = data.rollout(3)
    trainer.callbacks.remove(hook)
    data.setup("fit")  # the pipeline takes the trainer's hooks again
    plain = data.rollout(3)
    assert torch.equal(weighted.input_ids, plain.input_ids)
    assert torch.equal(weighted.weights, plain.weights)
    assert torch.equal(plain.weights, torch.ones_like(plain.weights))
    with torch.no_grad():
        assert torch.equal(module.loss_terms(weighted)[0]["sft"], module.loss_terms(plain)[0]["sft"])


# ----------------------------------------------------------------------------- off-policy p


def teacher_pipeline(ctx: RolloutContext, hooks: list[Any], refresh: int = 1) -> RolloutPipeline:
    """Teacher batches of 3 problems of the context's source, 2 teacher samples each, with K = 4
    student samples per measured problem."""
    return RolloutPipeline(
        ctx, ProblemSampler(ctx.source.problems("train"), 3, seed=0), hooks,
        samples_per_prompt=2, data_source="teacher", lmbda=None, off_policy_source="teacher",
        teacher_samples_per_prompt=2, teacher_correct_only=False, advantage_estimator="grpo", advantage_scale_by_std=True,
        pass_rate=PassRateSettings(rollouts=4, temperature=0.7, refresh_every_n_steps=refresh),
    )


def scripted(correct_out_of_4: dict[int, int]) -> ScriptedEngine:
    """Problem p{i} answered right in the first ``correct_out_of_4[i]`` of every 4 samples."""
    return ScriptedEngine({
        f"{i}+1=?\n": [f"\\boxed{{{i + 1}}}"] * c + ["\\boxed{x}"] * (4 - c) for i, c in correct_out_of_4.items()
    })


def test_off_policy_pass_rate_is_measured_from_the_student_once(make_context: MakeContext) -> None:
    engine = scripted({i: i % 3 for i in range(200)})
    ctx = make_context(engine)
    pipeline = teacher_pipeline(ctx, [BetaKernelWeighting(alpha=1.0, beta=1.0)], refresh=5)
    drawn = pipeline.sampler.draw(0)[0]
    batch = pipeline.rollout(0)
    measured = [call for call in engine.calls if call[1] == 4]
    assert len(measured) == 1 and measured[0][0] == [p.prompt for p in drawn]  # K = 4 student samples of each
    assert measured[0][2].temperature == 0.7
    expected = [int(p.problem_id[1:]) % 3 / 4 for p in drawn]
    assert [ctx.pass_rates.get(p.problem_id) for p in drawn] == expected
    assert torch.allclose(batch.extras["student_pass_rate"], torch.tensor(expected).repeat_interleave(2))
    raw = torch.tensor([0.0 if p in (0, 1) else p * (1 - p) for p in expected]).repeat_interleave(2)
    assert torch.allclose(batch.weights, raw * raw.numel() / raw.sum())
    # The measurement's student samples join the budget (the teacher's do not).
    assert ctx.counters.student_tokens == sum(len(a) for p in drawn for a in engine.answers[p.prompt])
    calls = len(engine.calls)
    ctx.policy_version = 4  # four steps later: estimates of step 0 are fresh enough (refresh 5)
    pipeline.rollout(0)
    assert len(engine.calls) == calls + 1  # the teacher's samples only
    ctx.policy_version = 5
    pipeline.rollout(0)
    assert len(engine.calls) == calls + 3  # stale now: measured again


def test_no_measurement_without_a_hook_that_reads_pass_rates(make_context: MakeContext) -> None:
    engine = scripted({i: 1 for i in range(200)})
    ctx = make_context(engine)
    teacher_pipeline(ctx, []).rollout(0)
    assert len(engine.calls) == 1 and len(ctx.pass_rates) == 0 and ctx.counters.student_tokens == 0


def test_tracker_state_round_trip() -> None:
    tracker = PassRateTracker()
    tracker.update("a", [1.0, 0.0], step=3)
    tracker.update("b", [1.0, 1.0, 1.0, 0.0], step=4)
    restored = PassRateTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.estimates == tracker.estimates and restored.get("b") == 0.75
    assert restored.is_stale("a", step=5, max_age=2) and not restored.is_stale("b", step=5, max_age=2)


# ----------------------------------------------------------------------------- schedule


class StepLog(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, dict[str, float]]] = []
        self.losses: list[LossConfig] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        loss = batch.loss or pl_module.loss_config
        self.rows.append((trainer.global_step, batch.policy_version, batch.source, dict(loss.active)))
        self.losses.append(loss)


def paced_module(student: str, teacher: str) -> DistillModule:
    return DistillModule(
        student=student, teacher=teacher, loss=LossConfig(forward_kl=1.0, temperature=0.9),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )


def test_schedule_switches_exactly_at_its_step(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_step=2)
    weighting = BetaKernelWeighting()
    steps = StepLog()
    module = paced_module(tiny_student, tiny_teacher)
    data = make_data(lmbda=0.5)  # the schedule turns GKD mixing off
    make_trainer(4, [schedule, weighting, steps]).fit(module, datamodule=data)
    assert [(s, v, src) for s, v, src, _ in steps.rows] == [
        (0, 0, "reference"), (1, 1, "reference"), (2, 2, "student"), (3, 3, "student"),
    ]
    assert [a for *_, a in steps.rows] == [{"forward_kl": 1.0}] * 2 + [{"reverse_kl": 1.0}] * 2
    assert all(loss.temperature == 0.9 for loss in steps.losses)  # settings the stage does not name are kept
    assert module.loss_config == LossConfig(forward_kl=1.0, temperature=0.9)  # the module is not modified
    assert (schedule.switched, schedule.switched_at_step) == (True, 2)
    assert len(data.pass_rates) >= 6


def test_switch_at_fraction_of_max_steps(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_fraction=0.25)
    steps = StepLog()
    make_trainer(4, [schedule, steps]).fit(paced_module(tiny_student, tiny_teacher), datamodule=make_data())
    assert [src for _, _, src, _ in steps.rows] == ["reference", "student", "student", "student"]
    assert schedule.switch_step(Trainer(max_steps=150, logger=False)) == 38


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KLSchedule()
    with pytest.raises(ValueError, match="exactly one"):
        KLSchedule(switch_at_step=3, switch_at_fraction=0.5)
    with pytest.raises(ValueError, match="switch_at_fraction"):
        KLSchedule(switch_at_fraction=1.5)
    with pytest.raises(ValueError, match="after.loss"):
        KLSchedule(after=ScheduleStage(loss={"reverse_KL": 1.0}), switch_at_step=1)
    with pytest.raises(ValueError, match="before.loss"):
        KLSchedule(before=ScheduleStage(loss={"forward_kl": 0.0}, data_source="teacher"), switch_at_step=1)
    with pytest.raises(ValueError, match="before.data_source: student"):
        KLSchedule(before=ScheduleStage(loss={"policy": 1.0}, data_source="teacher"), switch_at_step=1)


def test_a_stage_can_set_the_aggregation_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    from lit_zpd.callbacks.kl_schedule import stage_loss

    parser = ArgumentParser()
    parser.add_argument("--stage", type=ScheduleStage)
    stage = parser.instantiate_classes(
        parser.parse_args(["--stage", '{"loss": {"reverse_kl": 1, "aggregation": "token"}, "data_source": "student"}'])
    ).stage
    assert stage.loss == {"reverse_kl": 1.0, "aggregation": "token"}
    loss = stage_loss(LossConfig(forward_kl=1.0, aggregation="sample"), stage)
    assert loss.aggregation == "token" and loss.active == {"reverse_kl": 1.0}
    with pytest.raises(ValueError, match="after.loss is invalid"):
        KLSchedule(after=ScheduleStage(loss={"reverse_kl": 1.0, "aggregation": "tokens"}), switch_at_step=1)


def test_schedule_state_round_trip() -> None:
    schedule = KLSchedule(switch_at_step=5)
    schedule.switched, schedule.switched_at_step = True, 5
    restored = KLSchedule(switch_at_step=5)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict() == {"switched": True, "switched_at_step": 5}
    assert restored.state_key == schedule.state_key != KLSchedule(switch_at_step=6).state_key


def test_resumed_run_stays_switched(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    def fit(max_steps: int, ckpt_path: str | None = None) -> tuple[KLSchedule, Any, StepLog]:
        schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_fraction=0.5)
        weighting, steps, data = BetaKernelWeighting(), StepLog(), make_data()
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = Trainer(
            max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[schedule, weighting, steps, checkpoint],
        )
        trainer.fit(paced_module(tiny_student, tiny_teacher), datamodule=data, ckpt_path=ckpt_path)
        return schedule, data, steps

    first, _, _ = fit(4)  # switches at step 2
    assert (first.switched, first.switched_at_step) == (True, 2)
    ckpt = torch.load(tmp_path / "step=3.ckpt", weights_only=True)
    assert ckpt["callbacks"][first.state_key] == {"switched": True, "switched_at_step": 2}
    saved_rates = ckpt["RolloutDataModule"]["pass_rates"]
    assert saved_rates
    # Resumed with max_steps 7, 0.5 alone would switch at step 4; the saved stage keeps step 3 switched.
    resumed, resumed_data, steps = fit(7, str(tmp_path / "step=3.ckpt"))
    assert [(s, src) for s, _, src, _ in steps.rows] == [(3, "student"), (4, "student"), (5, "student"), (6, "student")]
    assert resumed.switched_at_step == 2
    assert set(saved_rates) <= set(resumed_data.pass_rates.estimates)


def test_minibatches_of_one_rollout_keep_its_stage(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_step=1)
    steps = StepLog()
    data = make_data(ppo_minibatches=2)
    make_trainer(4, [schedule, steps]).fit(paced_module(tiny_student, tiny_teacher), datamodule=data)
    assert [(src, list(a)) for _, _, src, a in steps.rows] == [
        ("reference", ["forward_kl"]), ("reference", ["forward_kl"]),
        ("student", ["reverse_kl"]), ("student", ["reverse_kl"]),
    ]
