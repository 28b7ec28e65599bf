"""Teacher kinds (a model directory, the live student, the student's starting weights) and the
alignment of response tokens between the student's and a different teacher prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lit_zpd.module import DistillModule, LoraSettings, LossConfig
from lit_zpd.rollout.batch import build_batch
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup
from lit_zpd.tasks.problem import Problem
from lit_zpd.teacher import AdaptersDisabled
from tests.test_rollout import make_data, make_trainer


def tokenize(module: DistillModule, text: str) -> list[int]:
    return module.tokenizer(text, add_special_tokens=False)["input_ids"]


def privileged_batch(module: DistillModule) -> tuple[list[str], list[list[int]], object]:
    """Rows whose teacher prompt carries a reference solution the student's prompt lacks; prompts of
    different lengths so that rows pad differently on the two sides."""
    groups, teacher_prompts, responses = [], [], []
    for i, (prompt, reference) in enumerate([("12+7=?\n", "2+7+0=9\n1+0+0=1\n\\boxed{19}"), ("3*4=?\n", "\\boxed{12}")]):
        problem = Problem(f"p{i}", prompt, "0", reference=reference)
        teacher_prompt = f"{prompt}Reference:\n{reference}\nNow solve it yourself.\n{prompt}"
        rows = [tokenize(module, text) for text in ("7+2=9\n\\boxed{9}", "1\n\\boxed{1}", "\\boxed{12}")[i:]]
        groups.append(RolloutGroup(PromptSpec(problem, teacher_prompt=teacher_prompt), rows, [""] * len(rows), [0.0] * len(rows)))
        teacher_prompts += [teacher_prompt] * len(rows)
        responses += rows
    batch = build_batch(groups, lambda text: tokenize(module, text), module.tokenizer.pad_token_id, "student")
    return teacher_prompts, responses, batch


def test_response_tokens_align_with_a_privileged_teacher_prompt(tiny_student: str, tiny_teacher: str) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0))
    teacher_prompts, responses, batch = privileged_batch(module)
    assert not torch.equal(batch.teacher_input_ids, batch.input_ids)
    assert torch.equal(batch.teacher_response_mask.sum(-1), batch.response_mask.sum(-1))
    from_batch = module.teacher_token_logprobs(batch)  # (N,) the values the loss compares
    separate = []
    with torch.no_grad():
        for prompt, response in zip(teacher_prompts, responses):
            ids = tokenize(module, prompt) + response
            logits = module.teacher(input_ids=torch.tensor([ids])).logits[0, :, : len(module.tokenizer)]
            at = torch.arange(len(tokenize(module, prompt)) - 1, len(ids) - 1)
            separate.append(torch.log_softmax(logits[at], -1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    assert torch.allclose(from_batch, torch.cat(separate), atol=1e-5)
    terms, _ = module.loss_terms(batch)
    assert torch.isfinite(terms["forward_kl"]) and terms["forward_kl"] > 0


def test_self_live_teacher_is_the_student(tiny_student: str, tmp_path: Path) -> None:
    module = DistillModule(student=tiny_student, teacher="self_live", loss=LossConfig(forward_kl=1.0))
    assert module.teacher is module.student and module.teacher_model is None and module.teacher_kind == "self_live"
    data = make_data(data_source="reference", prompts_per_step=2)
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    assert module.loss_terms(batch)[0]["forward_kl"].abs() < 1e-6  # same weights, same context: no divergence
    _, _, privileged = privileged_batch(module)
    assert module.loss_terms(privileged)[0]["forward_kl"] > 1e-4  # the reference in the teacher's context


def test_self_initial_teacher_is_a_frozen_copy_left_out_of_checkpoints(tiny_student: str, tmp_path: Path) -> None:
    def run(steps: int, ckpt: str | None = None) -> DistillModule:
        module = DistillModule(
            student=tiny_student, teacher="self_initial", loss=LossConfig(reverse_kl=1.0, sft=1.0),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        )
        trainer = Trainer(
            max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=make_data(data_source="student"), ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / f"{steps}.ckpt")
        return module

    module = run(2)
    start = DistillModule(student=tiny_student, teacher=None).student.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in module.teacher.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in module.student.state_dict().items())
    keys = torch.load(tmp_path / "2.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)
    resumed = run(3, str(tmp_path / "2.ckpt"))  # strict loading rebuilds the teacher from the student's directory
    assert all(torch.equal(v, start[k]) for k, v in resumed.teacher.state_dict().items())


def test_self_initial_with_lora_is_the_base_without_adapters(tiny_student: str) -> None:
    module = DistillModule(
        student=tiny_student, teacher="self_initial", lora=LoraSettings(r=4, alpha=8), loss=LossConfig(forward_kl=1.0),
    )
    assert isinstance(module.teacher, AdaptersDisabled) and module.teacher_model is None
    with torch.no_grad():
        for name, param in module.student.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        base = DistillModule(student=tiny_student, teacher=None).student(input_ids=ids).logits
        assert torch.allclose(module.teacher(input_ids=ids).logits, base, atol=1e-5)
        assert not torch.allclose(module.student(input_ids=ids).logits, base, atol=1e-3)
    # The teacher can also write responses (off-policy data), through the same engines.
    data = make_data(data_source="teacher", prompts_per_step=2)
    make_trainer(1).fit(module, datamodule=data)
    assert data.rollout(0).source == "teacher"
    assert all("lora" in k or k.startswith("student.") for k in module.state_dict())


def test_unknown_teacher_path_is_named(tiny_student: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="(?s)model.teacher: cannot load the tokenizer at .*must ship its tokenizer"):
        DistillModule(student=tiny_student, teacher=str(tmp_path))
