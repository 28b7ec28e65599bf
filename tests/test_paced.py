"""PACED: the Beta-kernel pass-rate weighting and the two-stage KL schedule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_zpd.callbacks.beta_kernel import BetaKernelWeighting
from lit_zpd.callbacks.kl_schedule import KLSchedule, ScheduleStage
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup, RolloutPlan
from lit_zpd.tasks.problem import Problem
from tests.test_rollout import make_data, make_trainer

FKL_ON_REFERENCE = ScheduleStage(loss={"forward_kl": 1.0}, data_source="reference")
RKL_ON_STUDENT = ScheduleStage(loss={"reverse_kl": 1.0}, data_source="student")


def group(pid: str, rewards: list[float], kind: str = "plain") -> RolloutGroup:
    spec = PromptSpec(Problem(pid, f"{pid}?", "1"), kind=kind)  # type: ignore[arg-type]
    return RolloutGroup(spec=spec, token_ids=[[1]] * len(rewards), texts=[""] * len(rewards), rewards=rewards)


def on_policy(hook: BetaKernelWeighting, groups: list[RolloutGroup]) -> list[list[float]]:
    plan = RolloutPlan(index=0, policy_version=0, source="student", prompts=[g.spec for g in groups])
    hook.on_rollout_scored(SimpleNamespace(global_step=0), plan, groups)
    return [g.weights for g in groups]


# ----------------------------------------------------------------------------- weights


def test_kernel_on_hand_values() -> None:
    hook = BetaKernelWeighting(alpha=2.0, beta=1.0, skip_extremes=False)
    assert hook.kernel(0.5) == pytest.approx(0.125)
    assert hook.kernel(0.25) == pytest.approx(0.25**2 * 0.75)
    assert BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=False).kernel(0.0) == 1.0
    assert BetaKernelWeighting(alpha=0.0, beta=1.0, skip_extremes=False).kernel(0.0) == 1.0
    assert BetaKernelWeighting(alpha=0.0, beta=1.0, skip_extremes=True).kernel(0.0) == 0.0


def test_weights_follow_p_one_minus_p_with_mean_one() -> None:
    groups = [group("a", [1, 0, 0, 0]), group("b", [1, 1, 0, 0]), group("c", [1, 1, 1, 0])]
    weights = on_policy(BetaKernelWeighting(alpha=1.0, beta=1.0), groups)
    raw = [0.1875, 0.25, 0.1875]
    scale = 12 / (4 * sum(raw))
    for row, r in zip(weights, raw):
        assert row == pytest.approx([r * scale] * 4)
    flat = torch.tensor([w for row in weights for w in row])
    assert flat.mean().item() == pytest.approx(1.0)


def test_extremes_are_skipped_and_all_zero_stays_zero() -> None:
    groups = [group("zero", [0, 0]), group("half", [1, 0]), group("one", [1, 1])]
    weights = on_policy(BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=True), groups)
    assert weights == [[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]]
    weights = on_policy(BetaKernelWeighting(), [group("zero", [0, 0]), group("one", [1, 1])])
    assert weights == [[0.0, 0.0], [0.0, 0.0]]


def test_bcq_groups_use_their_plain_groups_pass_rate() -> None:
    groups = [group("a", [1, 0]), group("a", [1, 1], kind="bcq"), group("b", [1, 0, 0, 0])]
    weights = on_policy(BetaKernelWeighting(skip_extremes=True), groups)
    assert weights[1] == weights[0] and weights[0][0] > 0  # p = 0.5 from the plain group, not 1.0


@pytest.mark.parametrize("key", ["alpha", "beta"])
def test_negative_exponent_names_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        BetaKernelWeighting(**{key: -0.5})
    with pytest.raises(ValueError, match="rollouts_for_pass_rate"):
        BetaKernelWeighting(rollouts_for_pass_rate=0)


def test_uniform_kernel_equals_unweighted_training(tiny_student: str) -> None:
    hook = BetaKernelWeighting(alpha=0.0, beta=0.0, skip_extremes=False)
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(sft=1.0), report_start_end=False)
    data = make_data(samples_per_prompt=4)
    trainer = make_trainer(1, [hook])
    trainer.fit(module, datamodule=data)
    weighted = data.rollout(3)
    trainer.callbacks.remove(hook)
    plain = data.rollout(3)
    assert torch.equal(weighted["input_ids"], plain["input_ids"])
    assert torch.equal(weighted["weights"], plain["weights"])
    assert torch.equal(plain["weights"], torch.ones_like(plain["weights"]))
    with torch.no_grad():
        assert torch.equal(module.loss_terms(weighted)[0]["sft"], module.loss_terms(plain)[0]["sft"])


# ----------------------------------------------------------------------------- off-policy p


class FakeEngine(RolloutEngine):
    """Answers prompt ``i`` (by decoded text) correctly in the first ``correct[text]`` samples."""

    def __init__(self, tokenizer: Any, correct: dict[str, int], answers: dict[str, str]) -> None:
        self.tokenizer, self.correct, self.answers = tokenizer, correct, answers
        self.calls: list[tuple[int, int, SamplingConfig]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append((len(prompts), n, sampling))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            good = self.tokenizer(f"\\boxed{{{self.answers[text]}}}", add_special_tokens=False)["input_ids"]
            bad = self.tokenizer("\\boxed{x}", add_special_tokens=False)["input_ids"]
            out.append([Completion(good if i < self.correct[text] else bad, [0.0]) for i in range(n)])
        return out


def test_off_policy_pass_rate_is_sampled_from_the_student_and_cached(tiny_student: str) -> None:
    hook = BetaKernelWeighting(alpha=1.0, beta=1.0, rollouts_for_pass_rate=4, temperature=0.7, refresh_every_n_steps=5)
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(sft=1.0), report_start_end=False)
    data = make_data(data_source="reference")
    data.setup("fit")
    problems = data.problems_for(0)
    engine = FakeEngine(
        module.tokenizer,
        correct={p.prompt: c for p, c in zip(problems, [0, 2, 1])},
        answers={p.prompt: p.answer for p in problems},
    )
    data.engine_for = lambda model: engine  # type: ignore[method-assign]
    trainer = make_trainer(1, [hook])
    trainer.fit(module, datamodule=data)
    assert engine.calls[0][:2] == (3, 4)  # K = 4 student samples of each of the 3 problems
    assert engine.calls[0][2].temperature == 0.7
    assert {problems[i].problem_id: hook.estimates[problems[i].problem_id][:2] for i in range(3)} == {
        problems[0].problem_id: (0.0, 4), problems[1].problem_id: (0.5, 4), problems[2].problem_id: (0.25, 4),
    }
    calls = len(engine.calls)
    batch = data.rollout(0)  # step 1: the step-0 estimates are fresh enough (refresh_every_n_steps=5)
    assert len(engine.calls) == calls
    assert batch["source"] == "reference"
    raw = torch.tensor([0.0, 0.25, 0.1875])
    assert torch.allclose(batch["weights"], raw * 3 / raw.sum())
    assert torch.allclose(batch["student_pass_rate"], torch.tensor([0.0, 0.5, 0.25]))
    assert torch.equal(batch["pass_rate"], torch.ones(3))  # the reference's own pass rate is untouched


class RecordingData:
    """The parts of RolloutDataModule the weighting uses; every sample is correct."""

    seed = 0
    sampling = SamplingConfig(max_new_tokens=5)

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.student_tokens = 0

    def engine_for(self, model: Any) -> Any:
        return self

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        self.prompts.extend(prompts)
        return [[Completion([1], [0.0])] * n for _ in prompts]

    def score(self, spec: PromptSpec, token_ids: list[list[int]]) -> RolloutGroup:
        return RolloutGroup(spec=spec, token_ids=token_ids, texts=[""] * len(token_ids), rewards=[1.0] * len(token_ids))


def test_stale_estimates_are_measured_again() -> None:
    hook = BetaKernelWeighting(rollouts_for_pass_rate=2, refresh_every_n_steps=2)
    hook.estimates = {"a": (0.5, 8, 0), "b": (0.5, 8, 3)}
    data = RecordingData()
    module = SimpleNamespace(tokenize=lambda text: [ord(c) for c in text], student=None)
    trainer = SimpleNamespace(global_step=4, datamodule=data, lightning_module=module)
    plan = RolloutPlan(index=4, policy_version=4, source="teacher", prompts=[])
    hook.on_rollout_scored(trainer, plan, [group("a", [0]), group("b", [0]), group("c", [0])])
    assert data.prompts == [[ord(c) for c in "a?"], [ord(c) for c in "c?"]]  # b is one step old: reused
    assert hook.estimates == {"a": (1.0, 2, 4), "b": (0.5, 8, 3), "c": (1.0, 2, 4)}
    assert data.student_tokens == 2 * 2  # two problems x K = 2 one-token completions join the budget


def test_state_round_trip() -> None:
    hook = BetaKernelWeighting()
    on_policy(hook, [group("a", [1, 0]), group("b", [1, 1, 1, 0])])
    state = hook.state_dict()
    restored = BetaKernelWeighting()
    restored.load_state_dict(state)
    assert restored.estimates == hook.estimates == {"a": (0.5, 2, 0), "b": (0.75, 4, 0)}
    assert restored.state_dict() == state
    BetaKernelWeighting().load_state_dict({})  # older checkpoints without the key


# ----------------------------------------------------------------------------- schedule


class StepLog(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, dict[str, float]]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        row = (trainer.global_step, batch["policy_version"], batch["source"], dict(pl_module.loss_config.active))
        self.rows.append(row)


def paced_module(student: str, teacher: str) -> DistillModule:
    return DistillModule(
        student=student, teacher=teacher, loss=LossConfig(forward_kl=1.0, temperature=0.9), report_start_end=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )


def test_schedule_switches_exactly_at_its_step(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_step=2)
    weighting = BetaKernelWeighting(rollouts_for_pass_rate=2)
    steps = StepLog()
    module = paced_module(tiny_student, tiny_teacher)
    data = make_data(lmbda=0.5)  # the schedule turns GKD mixing off
    make_trainer(4, [schedule, weighting, steps]).fit(module, datamodule=data)
    assert [(s, v, src) for s, v, src, _ in steps.rows] == [
        (0, 0, "reference"), (1, 1, "reference"), (2, 2, "student"), (3, 3, "student"),
    ]
    assert [a for *_, a in steps.rows] == [{"forward_kl": 1.0}] * 2 + [{"reverse_kl": 1.0}] * 2
    assert module.loss_config.temperature == 0.9  # settings the stage does not name are kept
    assert data.lmbda is None
    assert (schedule.switched, schedule.switched_at_step) == (True, 2)
    assert len(weighting.estimates) >= 6


def test_switch_at_fraction_of_max_steps(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_fraction=0.25)
    steps = StepLog()
    make_trainer(4, [schedule, steps]).fit(paced_module(tiny_student, tiny_teacher), datamodule=make_data())
    assert [src for _, _, src, _ in steps.rows] == ["reference", "student", "student", "student"]
    assert schedule.switch_step(SimpleNamespace(max_steps=150)) == 38  # type: ignore[arg-type]


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
    def fit(max_steps: int, ckpt_path: str | None = None) -> tuple[KLSchedule, BetaKernelWeighting, StepLog]:
        schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_fraction=0.5)
        weighting, steps = BetaKernelWeighting(rollouts_for_pass_rate=2), StepLog()
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = Trainer(
            max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[schedule, weighting, steps, checkpoint],
        )
        trainer.fit(paced_module(tiny_student, tiny_teacher), datamodule=make_data(), ckpt_path=ckpt_path)
        return schedule, weighting, steps

    first, first_weighting, _ = fit(4)  # switches at step 2
    assert (first.switched, first.switched_at_step) == (True, 2)
    ckpt = torch.load(tmp_path / "step=3.ckpt", weights_only=True)
    assert ckpt["callbacks"][first.state_key] == {"switched": True, "switched_at_step": 2}
    assert ckpt["callbacks"][first_weighting.state_key]["pass_rates"]
    # Resumed with max_steps 7, 0.5 alone would switch at step 4; the saved stage keeps step 3 switched.
    resumed, resumed_weighting, steps = fit(7, str(tmp_path / "step=3.ckpt"))
    assert [(s, src) for s, _, src, _ in steps.rows] == [(3, "student"), (4, "student"), (5, "student"), (6, "student")]
    assert resumed.switched_at_step == 2
    restored = BetaKernelWeighting(rollouts_for_pass_rate=2)
    restored.load_state_dict(ckpt["callbacks"][first_weighting.state_key])
    assert set(restored.estimates) <= set(resumed_weighting.estimates)


def test_minibatches_of_one_rollout_keep_its_stage(tiny_student: str, tiny_teacher: str) -> None:
    schedule = KLSchedule(before=FKL_ON_REFERENCE, after=RKL_ON_STUDENT, switch_at_step=1)
    steps = StepLog()
    data = make_data(ppo_minibatches=2)
    make_trainer(4, [schedule, steps]).fit(paced_module(tiny_student, tiny_teacher), datamodule=data)
    assert [(src, list(a)) for _, _, src, a in steps.rows] == [
        ("reference", ["forward_kl"]), ("reference", ["forward_kl"]),
        ("student", ["reverse_kl"]), ("student", ["reverse_kl"]),
    ]
