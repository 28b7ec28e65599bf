"""HFEngine: batching of prompts into generate calls."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine


def test_calls_group_similar_lengths_and_respect_the_batch_size() -> None:
    engine = HFEngine(model=None, pad_token_id=0, eos_token_id=1, vocab_size=10, batch_size=6)  # type: ignore[arg-type]
    prompts = [[2] * length for length in (3, 40, 4, 2, 50, 5, 6, 90)]
    calls = engine._calls(prompts, n=2)  # at most 3 prompts per call
    assert sorted(i for call in calls for i in call) == list(range(len(prompts)))
    assert calls == [[3, 0, 2], [5, 6], [1, 4], [7]]
    for call in calls:
        lengths = [len(prompts[i]) for i in call]
        assert len(call) <= 3 and max(lengths) <= 2 * min(lengths)


def test_mixed_lengths_come_back_in_prompt_order(tiny_student: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer))
    texts = ["1+1=", "What is 12+30? Think about it, then answer.\n", "7-3=", "2*4="]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    together = engine.generate(prompts, 1, greedy)
    alone = [engine.generate([p], 1, greedy)[0] for p in prompts]
    assert [c[0].token_ids for c in together] == [c[0].token_ids for c in alone]
    for got, want in zip(together, alone):
        assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-4)


def test_sampled_logprobs_equal_a_teacher_forced_forward(tiny_student: str) -> None:
    """The step-by-step recorder gives each sampled token's log-probability at the sampling
    temperature, as a forward pass over prompt + completion computes it."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("1+1=", "12*3=")]
    torch.manual_seed(0)
    out = engine.generate(prompts, 3, SamplingConfig(temperature=0.7, max_new_tokens=8))
    lengths = set()
    for prompt, completions in zip(prompts, out):
        for c in completions:
            lengths.add(len(c.token_ids))
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1, : len(tokenizer)] / 0.7
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert c.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    assert all(length > 0 for length in lengths)
