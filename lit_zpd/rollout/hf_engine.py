"""Rollouts with Hugging Face ``generate`` on the live model: no copy, so no weight sync.

The sampled tokens' log-probabilities are computed step by step by a logits processor that keeps
one step's ``(rows, vocabulary)`` log-probabilities, instead of asking ``generate`` for every
step's logits (``steps x rows x vocabulary`` floats: 7 GB for 64 rows of 200 tokens at a
151,936-token vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig, stop_ids


class HFEngine(RolloutEngine):
    """Samples with ``model.generate`` on left-padded prompt batches.

    Args:
        model: The causal LM whose current weights are sampled (the live student or the teacher).
        pad_token_id: Padding id of the tokenizer.
        eos_token_id: End-of-sequence id, or the ids of every token that ends a completion (an
            instruct model's stop tokens); a completion stops after the first.
        vocab_size: Tokens the tokenizer knows; ids past it (padding rows of the output head) are
            never sampled and the log-probabilities are normalised over the first ``vocab_size``.
        batch_size: Sequences (prompts x samples) per ``generate`` call, to bound memory.
    """

    def __init__(
        self, model: PreTrainedModel, pad_token_id: int, eos_token_id: int | list[int], vocab_size: int, batch_size: int = 256
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.stop_ids = stop_ids(eos_token_id)
        self.vocab_size = vocab_size
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[list[Completion]] = [[] for _ in prompts]
            for call in self._calls(prompts, n):
                for i, completions in zip(call, self._generate_batch([prompts[i] for i in call], n, sampling)):
                    out[i] = completions
            return out
        finally:
            self.model.train(was_training)

    def _calls(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """Prompt indices per ``generate`` call: at most ``batch_size // n`` prompts, sorted by
        length, and a new call whenever a prompt is over twice the shortest of the call, so that
        left padding stays under half of each row (a few long reformulated prompts would
        otherwise make every short one pay for their length)."""
        per_call = max(1, self.batch_size // n)
        calls: list[list[int]] = []
        for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            call = calls[-1] if calls else None
            if call is None or len(call) == per_call or len(prompts[i]) > 2 * max(1, len(prompts[call[0]])):
                calls.append([i])
            else:
                call.append(i)
        return calls

    def _generate_batch(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention_mask[row, width - len(p) :] = 1
        config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=0 if not sampling.greedy else None,  # no top-k cut when sampling
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.stop_ids,
            suppress_tokens=list(range(self.vocab_size, self.model.get_output_embeddings().out_features)) or None,
            return_dict_in_generate=True,
        )
        recorder = SampledLogprobs(self.vocab_size, sampling.temperature if not sampling.greedy else 1.0)
        result = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
            logits_processor=LogitsProcessorList([recorder]) if sampling.logprobs else None,
        )
        tokens = result.sequences[:, width:]  # (B * n, L)
        if not sampling.logprobs:
            completions = [self._trim(tokens[r].tolist(), []) for r in range(tokens.shape[0])]
            return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]
        logprobs = recorder.finish(result.sequences)  # (B * n, L)
        completions = [self._trim(tokens[r].tolist(), logprobs[r].tolist()) for r in range(tokens.shape[0])]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _trim(self, token_ids: list[int], logprobs: list[float]) -> Completion:
        """Cut after the first stop token (generate pads finished rows)."""
        end = next((i + 1 for i, t in enumerate(token_ids) if t in self.stop_ids), None)
        if end is not None:
            token_ids, logprobs = token_ids[:end], logprobs[:end]
        return Completion(token_ids=token_ids, logprobs=logprobs)


class SampledLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits[:vocab] / temperature)`` of every sampled token.

    ``generate`` calls it with each step's raw scores (custom processors run before its
    temperature and top-p warpers); the token sampled from a step's scores is the last column of
    the next call's ``input_ids`` (of the final sequences for the last step), so only one step's
    log-probabilities are kept.

    Args:
        vocab: Tokens the tokenizer knows; the distribution is normalised over them.
        temperature: The sampling temperature (1 for greedy).
    """

    def __init__(self, vocab: int, temperature: float) -> None:
        self.vocab, self.temperature = vocab, temperature
        self.pending: Tensor | None = None  # (rows, vocab) the last step's log-probabilities
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids[:, -1])
        self.pending = F.log_softmax(scores[:, : self.vocab].float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """``(rows, steps)`` the log-probabilities, given ``generate``'s output sequences."""
        self._record(sequences[:, -1])
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)

    def _record(self, tokens: Tensor) -> None:
        if self.pending is not None:
            # Finished rows continue with padding, which may lie past the vocabulary; they are trimmed.
            self.steps.append(self.pending.gather(-1, tokens.clamp(max=self.vocab - 1)[:, None]).squeeze(-1))
            self.pending = None
