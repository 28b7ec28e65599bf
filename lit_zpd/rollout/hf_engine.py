"""Rollouts with Hugging Face ``generate`` on the live model: no copy, so no weight sync."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel

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
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.stop_ids,
            suppress_tokens=list(range(self.vocab_size, self.model.get_output_embeddings().out_features)) or None,
            output_logits=sampling.logprobs,
            return_dict_in_generate=True,
        )
        result = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        tokens = result.sequences[:, width:]  # (B * n, L)
        if not sampling.logprobs:
            completions = [self._trim(tokens[r].tolist(), []) for r in range(tokens.shape[0])]
            return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]
        temperature = sampling.temperature if not sampling.greedy else 1.0
        logits = torch.stack(result.logits, dim=1)[..., : self.vocab_size].float() / temperature  # (B * n, L, V)
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        completions = [self._trim(tokens[r].tolist(), logprobs[r].tolist()) for r in range(tokens.shape[0])]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _trim(self, token_ids: list[int], logprobs: list[float]) -> Completion:
        """Cut after the first stop token (generate pads finished rows)."""
        end = next((i + 1 for i, t in enumerate(token_ids) if t in self.stop_ids), None)
        if end is not None:
            token_ids, logprobs = token_ids[:end], logprobs[:end]
        return Completion(token_ids=token_ids, logprobs=logprobs)
