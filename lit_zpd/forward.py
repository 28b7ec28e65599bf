"""Teacher-forced reading of responses: a decoder's final hidden states and its output head.

The loss (:class:`~lit_zpd.module.DistillModule`) and the measurements that score a response
under a model (:meth:`~lit_zpd.rollout.context.RolloutContext.sequence_logprobs`) both go through
these, so no caller builds a ``tokens x vocabulary`` logits tensor.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_zpd.losses import LinearHead, linear_token_logprobs


def final_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states ``(B, T, H)`` from the decoder body, without the output head."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def output_head(model: Any, vocab: int) -> LinearHead:
    """The output head restricted to the tokenizer's ids (heads are often padded past them); a
    view with LoRA adapters off names its base layer (``linear``)."""
    head = model.get_output_embeddings()
    return LinearHead.of(getattr(head, "linear", head), vocab)


def response_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, vocab: int,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> Tensor:
    """``(N,)`` log-probabilities of the response tokens (``response_mask``, ``(B, T)``) of
    right-padded rows, in row order, without gradient."""
    mask = response_mask[:, 1:].bool()
    hidden = final_hidden(model, input_ids, attention_mask)[:, :-1][mask]
    return linear_token_logprobs(hidden, output_head(model, vocab), input_ids[:, 1:][mask], temperature, chunk_size)
