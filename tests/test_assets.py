"""The shipped teacher and student meet the bars the embedded default promises."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lit_zpd.assets import resolve
from lit_zpd.diagnostics.exposure import accuracy_by_reveal, load_context
from lit_zpd.module import DistillModule
from lit_zpd.rollout.datamodule import RolloutDataModule
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.tasks.arithmetic import SKILL_GRAPH, ArithmeticCurriculum


def n_params(name: str) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(resolve(name)).parameters())


def test_embedded_models_are_qwen_with_head_dim_32_and_share_the_tokenizer() -> None:
    for name in ("embedded:teacher", "embedded:student"):
        config = AutoConfig.from_pretrained(resolve(name))
        assert config.model_type.startswith("qwen")
        assert config.head_dim >= 32
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
        assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(resolve("embedded:tokenizer")).get_vocab()
    assert n_params("embedded:teacher") >= 3 * n_params("embedded:student")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ValueError, match="unknown embedded asset"):
        resolve("embedded:nope")


def evaluate(model: str) -> dict[str, float]:
    module = DistillModule(student=model, teacher=None)
    data = RolloutDataModule(eval_samples=8, eval_sampling=SamplingConfig(temperature=1.0, max_new_tokens=48))
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    return {k.removeprefix("eval/"): float(v) for k, v in trainer.callback_metrics.items()}


def test_teacher_is_strong_on_every_skill() -> None:
    report = evaluate("embedded:teacher")
    for skill in SKILL_GRAPH:
        assert report[f"greedy/{skill}"] >= 0.95 - 1e-6, (skill, report)  # float32 means: 38 / 40 is 0.94999999


def test_student_is_partially_competent() -> None:
    report = evaluate("embedded:student")
    assert report["partial_fraction/all"] >= 0.30, report
    assert 0.0 < report["greedy/all"] < 0.95, report


def test_student_reads_a_privileged_context() -> None:
    """The full reference in the prompt raises the student's greedy accuracy well above its
    accuracy on the problem alone (what OPSD and ATESD need of a self-teacher)."""
    source = ArithmeticCurriculum()
    ctx = load_context("embedded:student", source)
    accuracy = accuracy_by_reveal(ctx, ctx.student, source.problems("validation"), source.privileged_context(), [1.0])
    assert accuracy["1"]["all"] >= accuracy["none"]["all"] + 0.25, accuracy
