"""Shared fixtures: a tiny Qwen3 student and teacher on the embedded character tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_zpd.tokenizer import build_char_tokenizer


def _tiny_model(path: Path, seed: int, hidden: int, layers: int) -> str:
    tokenizer = build_char_tokenizer()
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a randomly initialised 1-layer Qwen3 (head_dim 32) with the char tokenizer."""
    return _tiny_model(tmp_path_factory.mktemp("student"), seed=0, hidden=64, layers=1)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _tiny_model(tmp_path_factory.mktemp("teacher"), seed=1, hidden=64, layers=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the suite may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
