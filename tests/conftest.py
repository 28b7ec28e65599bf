"""Shared fixtures: a tiny Qwen3 student and teacher on the embedded character tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_zpd.loss_config import LossConfig
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.prompts import PromptFormat
from lit_zpd.tasks.problem import Problem, ProblemSource
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


class ByteTokenizer:
    """Bytes as token ids; id 0 pads, id 1 ends a sequence. Enough of a tokenizer for the context."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [list(t.encode()) for t in text]}
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i > 1).decode()


class ScriptedEngine(RolloutEngine):
    """Answers each prompt (by its text) with scripted responses, cycling through them."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], int, SamplingConfig]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        texts = [bytes(p).decode() for p in prompts]
        self.calls.append((texts, n, sampling))
        scripted = [[self.answers[t][i % len(self.answers[t])] for i in range(n)] for t in texts]
        return [[Completion(list(a.encode()), [0.0] * len(a)) for a in answers] for answers in scripted]


class ListSource(ProblemSource):
    """Problems ``p0 .. p{n-1}``: prompt ``"{i}+1=?\\n"``, answer ``i + 1``, all in train."""

    def __init__(self, n: int = 200) -> None:
        self.rows = [Problem(problem_id=f"p{i}", prompt=f"{i}+1=?\n", answer=str(i + 1)) for i in range(n)]

    def problems(self, split: str) -> list[Problem]:
        return list(self.rows) if split == "train" else []


@pytest.fixture
def make_context() -> Callable[..., RolloutContext]:
    """A RolloutContext over :class:`ListSource` whose student and teacher are sampled by
    scripted engines: for unit tests of rollout hooks, with no model and no trainer."""

    def make(
        engine: RolloutEngine | None = None, rank: int = 0, world_size: int = 1, teacher: bool = True, seed: int = 0,
        source: ProblemSource | None = None, prompt: PromptFormat | None = None,
    ) -> RolloutContext:
        student, teacher_model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        scripted = engine or ScriptedEngine({})
        return RolloutContext(
            student=student, teacher=teacher_model if teacher else None, tokenizer=ByteTokenizer(),
            source=source or ListSource(), engine_factory=lambda model: scripted, seed=seed,
            loss=LossConfig(forward_kl=1.0), rank=rank, world_size=world_size, prompt=prompt or PromptFormat(),
        )

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
