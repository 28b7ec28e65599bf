"""RolloutDataModule: zero policy lag, determinism, data sources and the hook points."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lit_zpd.losses import token_logprobs
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.datamodule import RolloutDataModule
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import PromptSpec, RolloutHook
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum


def make_data(**kwargs: Any) -> RolloutDataModule:
    defaults: dict[str, Any] = dict(
        source=ArithmeticCurriculum(problems_per_level=20, max_eval_per_skill=2),
        prompts_per_step=3,
        samples_per_prompt=2,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        eval_samples=0,
        eval_sampling=SamplingConfig(max_new_tokens=8),
    )
    return RolloutDataModule(**(defaults | kwargs))


def make_trainer(steps: int, callbacks: list[Callback] | None = None, **kwargs: Any) -> Trainer:
    return Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks or [],
        **kwargs,
    )


def recompute_logprobs(module: DistillModule, batch: dict[str, Any], student: torch.nn.Module) -> torch.Tensor:
    """Log-probs of the batch's response tokens under ``student`` at the sampling temperature."""
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["response_mask"][:, 1:].bool()
    vocab = len(module.tokenizer)
    return token_logprobs(logits[:, :-1][mask][:, :vocab], batch["input_ids"][:, 1:][mask], batch["sampling_temperature"])


class LagProbe(Callback):
    """Records, before every training step, how the batch's sampling log-probs compare with the
    current weights and with the weights of one step earlier."""

    def __init__(self) -> None:
        self.versions: list[tuple[int, int]] = []
        self.current_error: list[float] = []
        self.stale_error: list[float] = []
        self._previous: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.versions.append((batch["policy_version"], trainer.global_step))
        sampled = batch["sampling_logprobs"][:, 1:][batch["response_mask"][:, 1:].bool()]
        self.current_error.append((recompute_logprobs(pl_module, batch, pl_module.student) - sampled).abs().max().item())
        if self._previous is not None:
            current = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
            pl_module.student.load_state_dict(self._previous)
            stale = recompute_logprobs(pl_module, batch, pl_module.student)
            pl_module.student.load_state_dict(current)
            self.stale_error.append((stale - sampled).abs().max().item())
        self._previous = {k: v.clone() for k, v in pl_module.student.state_dict().items()}


def fast_moving_student(student: str) -> DistillModule:
    """A student whose every step moves its log-probs visibly (SGD, large lr): stale weights show."""
    return DistillModule(
        student=student,
        teacher=None,
        loss=LossConfig(policy=1.0, sft=1.0),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        report_start_end=False,
    )


def test_zero_policy_lag(tiny_student: str) -> None:
    """Rollouts for step t are sampled by the weights after step t-1, not by older ones."""
    module = fast_moving_student(tiny_student)
    probe = LagProbe()
    make_trainer(4, [probe]).fit(module, datamodule=make_data())
    assert probe.versions == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert max(probe.current_error) < 1e-4
    # The probe can tell stale weights apart: the previous step's weights give other log-probs.
    assert min(probe.stale_error) > 1e-3


def test_rollout_is_a_function_of_the_batch_index(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None, report_start_end=False)
    data = make_data()
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=data)  # attaches module and data to the trainer
    first, again, other = data.rollout(5), data.rollout(5), data.rollout(6)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert first["problem_ids"] == again["problem_ids"]
    assert first["problem_ids"] != other["problem_ids"]
    assert torch.equal(first["group_index"], torch.tensor([0, 0, 1, 1, 2, 2]))


def test_problems_cover_the_train_split_each_epoch(tiny_student: str) -> None:
    data = make_data(prompts_per_step=7)
    data.setup("fit")
    n = len(data._train)
    seen = [p.problem_id for i in range(n // 7) for p in data.problems_for(i)]
    assert len(seen) == len(set(seen))


def test_reference_and_teacher_sources(tiny_student: str, tiny_teacher: str) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0), report_start_end=False)
    data = make_data(data_source="reference")
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    problems = data.problems_for(0)
    assert batch["source"] == "reference"
    assert "sampling_logprobs" not in batch
    assert batch["completions"] == [p.reference for p in problems]
    assert batch["rewards"].tolist() == [1.0] * len(problems)
    data.data_source = "teacher"
    data.teacher_samples_per_prompt = 2
    batch = data.rollout(0)
    assert batch["input_ids"].shape[0] == 2 * len(problems)
    data.teacher_correct_only = True
    with pytest.raises(RuntimeError, match="no responses"):
        data.rollout(0)  # an untrained teacher solves nothing


def test_lmbda_mixes_on_and_off_policy_batches() -> None:
    data = make_data(lmbda=0.5, off_policy_source="reference")
    sources = [data.source_for(i) for i in range(200)]
    assert set(sources) == {"student", "reference"}
    assert 70 < sources.count("student") < 130
    assert make_data(lmbda=1.0).source_for(3) == "student"


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="data.prompts_per_step"):
        make_data(prompts_per_step=0)
    with pytest.raises(ValueError, match="data.lmbda"):
        make_data(lmbda=1.5)
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=0)


class EditingHook(Callback, RolloutHook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_rollout_plan(self, trainer: Any, plan: Any) -> None:
        self.calls.append("plan")
        plan.prompts.append(PromptSpec(plan.prompts[0].problem, kind="ncq", student_prompt="1+1=?\n"))

    def on_rollout_scored(self, trainer: Any, plan: Any, groups: list) -> None:
        self.calls.append("scored")
        groups[0].weights = [3.0] * len(groups[0].weights)

    def on_batch_built(self, trainer: Any, plan: Any, batch: dict) -> None:
        self.calls.append("built")
        batch["extra"] = torch.ones(1)


def test_hooks_edit_plan_weights_and_batch(tiny_student: str) -> None:
    hook = EditingHook()
    module = DistillModule(student=tiny_student, teacher=None, report_start_end=False)
    data = make_data()
    make_trainer(1, [hook]).fit(module, datamodule=data)
    assert hook.calls == ["plan", "scored", "built"]
    batch = data.rollout(1)
    assert batch["kinds"][-2:] == ["ncq", "ncq"]
    assert batch["weights"][:2].tolist() == [3.0, 3.0]
    assert "extra" in batch
