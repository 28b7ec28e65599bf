"""The engine interface: sample completions for token prompts from a model's current weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Args:
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling mass; 1 keeps the whole distribution.
        max_new_tokens: Completion length cap; a completion also ends at the end-of-sequence token.
        logprobs: Return the sampled tokens' log-probabilities (training rollouts need them). Without
            them (``False``: a diagnostic's continuations) ``Completion.logprobs`` is empty and the
            HF engine keeps no per-step logits.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion.

    Args:
        token_ids: Completion tokens, ending with the end-of-sequence token when one was produced.
        logprobs: Per-token ``log_softmax(logits / temperature)`` of the sampled tokens under the
            weights that sampled them (before top-p truncation; temperature 1 when greedy); empty
            when the sampling asked for none.
    """

    token_ids: list[int]
    logprobs: list[float]


def stop_ids(eos_token_id: int | list[int]) -> list[int]:
    """The ids that end a completion: one end-of-sequence id, or a list of them."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


class RolloutEngine(ABC):
    """Samples from one model. Engines that hold their own copy of the weights implement
    :meth:`sync_weights`; the training loop calls it after every optimizer step."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""

    def sync_weights(self, model: nn.Module) -> None:  # noqa: B027 - engines on the live model need nothing
        """Make the next :meth:`generate` use ``model``'s current weights."""
