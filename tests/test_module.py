"""DistillModule: configuration errors, loss terms on real batches, LoRA and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_zpd.callbacks.export import SaveStudent
from lit_zpd.module import DistillModule, LoraSettings, LossConfig
from lit_zpd.tokenizer import build_char_tokenizer
from tests.test_rollout import OddLengthVerifier, make_data, make_trainer


def test_loss_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one coefficient"):
        LossConfig()
    with pytest.raises(ValueError, match="model.loss.jsd_beta"):
        LossConfig(jsd=1.0, jsd_beta=2.0)
    with pytest.raises(ValueError, match="model.loss.sft"):
        LossConfig(sft=-1.0)
    assert LossConfig(sft=1.0, jsd=0.5).active == {"sft": 1.0, "jsd": 0.5}


def test_teacher_terms_need_a_teacher(tiny_student: str) -> None:
    with pytest.raises(ValueError, match="set model.teacher"):
        DistillModule(student=tiny_student, teacher=None, loss=LossConfig(reverse_kl=1.0))


def test_teacher_with_another_tokenizer_is_refused(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    other = tmp_path / "other_teacher"
    AutoModelForCausalLM.from_pretrained(tiny_teacher).save_pretrained(other)
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="differs from the student's"):
        DistillModule(student=tiny_student, teacher=str(other))


def test_tokenizer_keeps_newlines_in_a_model_directory(tiny_student: str) -> None:
    """A model directory's config must not make AutoTokenizer swap in a byte-level tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    text = "7+8+0=15\n\\boxed{15}"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_policy_terms_refuse_off_policy_data(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0))
    with pytest.raises(ValueError, match="need student rollouts"):
        make_trainer(1).fit(module, datamodule=make_data(data_source="reference"))


@pytest.mark.parametrize(
    "loss, data_source",
    [
        (LossConfig(sft=1.0), "reference"),
        (LossConfig(forward_kl=1.0), "teacher"),
        (LossConfig(jsd=1.0, jsd_beta=0.5, temperature=0.9), "student"),
        (LossConfig(reverse_kl=1.0, chunk_size=7), "student"),
        (LossConfig(on_policy_distill=1.0), "student"),
        (LossConfig(policy=1.0, dual_clip=3.0), "student"),
    ],
)
def test_every_loss_term_trains(tiny_student: str, tiny_teacher: str, loss: LossConfig, data_source: str) -> None:
    # A random student never solves a problem: reward odd-length responses so groups have a spread
    # and the policy term a non-zero advantage.
    module = DistillModule(
        student=tiny_student, teacher=tiny_teacher, loss=loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),  # no weight decay: weights move only by gradient
    )
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    data = make_data(data_source=data_source, prompts_per_step=4, samples_per_prompt=4, verifier=OddLengthVerifier())
    make_trainer(2).fit(module, datamodule=data)
    batch = data.rollout(0)
    terms, _ = module.loss_terms(batch)
    assert set(terms) == set(loss.active)
    assert all(torch.isfinite(v) for v in terms.values())
    if loss.policy:
        assert batch.advantages.abs().sum() > 0
    changed = any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
    assert changed


@pytest.mark.parametrize("term", ["sft", "forward_kl"])
def test_loss_falls_on_a_fixed_batch(tiny_student: str, tiny_teacher: str, term: str) -> None:
    """SFT fits the references; forward KL moves the student towards the teacher."""
    module = DistillModule(
        student=tiny_student, teacher=tiny_teacher, loss=LossConfig(**{term: 1.0})
    )
    data = make_data(data_source="reference", prompts_per_step=4)
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    optimizer = torch.optim.Adam(module.student.parameters(), lr=1e-2)
    first = module.loss_terms(batch)[0][term].item()
    for _ in range(20):
        optimizer.zero_grad()
        module.loss_terms(batch)[0][term].backward()
        optimizer.step()
    assert module.loss_terms(batch)[0][term].item() < 0.5 * first


def test_sample_weights_scale_the_loss(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data(data_source="reference", prompts_per_step=4)
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    base = module.loss_terms(batch)[0]["sft"]
    batch.weights = torch.full_like(batch.weights, 2.0)
    assert torch.allclose(module.loss_terms(batch)[0]["sft"], 2 * base)
    batch.weights = torch.tensor([1.0, 0.0, 0.0, 0.0])
    only_first = module.loss_terms(batch)[0]["sft"]
    first_row = batch.take([0], weights=torch.ones(1))
    alone = module.loss_terms(first_row)[0]["sft"]
    assert torch.allclose(only_first, alone / 4)  # "sample" aggregation: mean over the 4 samples


def test_lora_trains_adapters_only_and_exports_merged(tiny_student: str, tmp_path: Path) -> None:
    module = DistillModule(
        student=tiny_student,
        teacher=None,
        lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = tmp_path / "exported"
    make_trainer(2, [SaveStudent(str(out))]).fit(module, datamodule=make_data(data_source="reference"))
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in exported.named_parameters())
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        expected = module.student(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_student)(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, original, atol=1e-4)  # the adapters did learn something
    assert AutoTokenizer.from_pretrained(out).decode([15, 3, 16]) == "a\nb"


def test_checkpoint_leaves_the_teacher_out(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0))
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=make_data(data_source="reference"))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    keys = torch.load(path, weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)


def _gradients(module: DistillModule, batch: object, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    module.student.zero_grad()
    loss, terms, _ = module.step_loss(batch, cfg)  # type: ignore[arg-type]
    loss.backward()
    return loss.detach(), terms, [p.grad.clone() for p in module.student.parameters()]


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(sft=1.0, forward_kl=0.5),
        LossConfig(jsd=1.0, entry_clip=0.05, aggregation="token"),
        LossConfig(policy=1.0, on_policy_distill=0.5),
    ],
)
def test_micro_batches_equal_one_pass_in_loss_and_gradient(tiny_student: str, tiny_teacher: str, loss: LossConfig) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=loss)
    data = make_data(data_source="student", prompts_per_step=3, samples_per_prompt=3, verifier=OddLengthVerifier())
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(1)
    batch.weights = torch.linspace(0.5, 2.0, batch.size)  # rows weigh differently: the coefficients must be the step's
    want_loss, want_terms, want = _gradients(module, batch, loss)
    for size in (1, 4):
        module.micro_batch_size = size
        got_loss, got_terms, got = _gradients(module, batch, loss)
        torch.testing.assert_close(got_loss, want_loss)
        assert got_terms.keys() == want_terms.keys()
        for name in want_terms:
            torch.testing.assert_close(got_terms[name], want_terms[name])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in want)


def test_micro_batched_training_matches_one_pass_in_a_trainer(tiny_student: str, tiny_teacher: str) -> None:
    """Two real runs, one with micro-batches of 2 rows: the same weights after 3 steps."""
    states = []
    for size in (None, 2):
        module = DistillModule(
            student=tiny_student, teacher=tiny_teacher, loss=LossConfig(jsd=1.0), micro_batch_size=size,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        )
        make_trainer(3).fit(module, datamodule=make_data(data_source="student", prompts_per_step=2, samples_per_prompt=3))
        states.append(module.student.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(v, AutoModelForCausalLM.from_pretrained(tiny_student).state_dict()[k]) for k, v in states[0].items())


def test_gradient_checkpointing_gives_the_same_gradient(tiny_student: str, tiny_teacher: str) -> None:
    loss = LossConfig(sft=1.0, reverse_kl=1.0)
    plain = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=loss)
    checkpointed = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=loss, gradient_checkpointing=True)
    assert checkpointed.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    data = make_data(data_source="reference", prompts_per_step=3)
    make_trainer(1).fit(plain, datamodule=data)
    batch = data.rollout(0)
    checkpointed.student.load_state_dict(plain.student.state_dict())
    _, _, want = _gradients(plain, batch, loss)
    _, _, got = _gradients(checkpointed.train(), batch, loss)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_model_dtypes(tiny_student: str, tiny_teacher: str) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, teacher_dtype="bfloat16", loss=LossConfig(forward_kl=1.0))
    assert next(module.student.parameters()).dtype == torch.float32
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    half = DistillModule(student=tiny_student, teacher=tiny_teacher, student_dtype="bfloat16", loss=LossConfig(forward_kl=1.0))
    assert {p.dtype for p in half.student.parameters()} == {torch.bfloat16}
    assert next(half.teacher.parameters()).dtype == torch.bfloat16  # the student's by default
    make_trainer(2).fit(half, datamodule=make_data(data_source="student", prompts_per_step=2))
    assert all(torch.isfinite(p).all() for p in half.student.parameters())
    with pytest.raises(ValueError, match="model.student_dtype"):
        DistillModule(student=tiny_student, teacher=None, student_dtype="float8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.teacher_dtype"):
        DistillModule(student=tiny_student, teacher="self_initial", teacher_dtype="bfloat16")
    with pytest.raises(ValueError, match="model.micro_batch_size"):
        DistillModule(student=tiny_student, teacher=None, micro_batch_size=0)
