"""Turn scored rollout groups into the tensors one training step consumes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_zpd.rollout.plan import RolloutGroup


def _pack(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + response`` rows: (input_ids, attention_mask, response_mask), each (B, T)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        response_mask[row, len(p) : len(p) + len(r)] = 1
    return input_ids, attention_mask, response_mask


def build_batch(
    groups: list[RolloutGroup],
    tokenize: Any,
    pad_token_id: int,
    advantages: list[float] | None = None,
) -> dict[str, Any]:
    """The step's batch, one row per completion.

    Args:
        groups: Scored groups, in order.
        tokenize: ``str -> list[int]`` without special tokens.
        pad_token_id: Padding id.
        advantages: One advantage per row; zeros if ``None``.

    Returns:
        ``input_ids``, ``attention_mask``, ``response_mask`` (B, T): prompt and completion, 1 on
        completion tokens; ``teacher_input_ids``, ``teacher_attention_mask``,
        ``teacher_response_mask``: the same completions after the teacher's prompt (the same
        tensors when no group has a privileged context); ``sampling_logprobs`` (B, T) aligned with
        ``input_ids`` (present for student rollouts); ``rewards``, ``advantages``, ``weights``,
        ``pass_rate``, ``group_index`` (B,); ``problem_ids``, ``skills``, ``kinds``, ``prompts``
        (the student's prompt text), ``completions`` (lists of B strings).
    """
    rows = [(g, i) for g in groups for i in range(len(g.token_ids))]
    group_index = [k for k, g in enumerate(groups) for _ in g.token_ids]
    responses = [g.token_ids[i] for g, i in rows]
    student_prompts = {id(g): tokenize(g.spec.student_prompt) for g in groups}
    prompts = [student_prompts[id(g)] for g, _ in rows]
    input_ids, attention_mask, response_mask = _pack(prompts, responses, pad_token_id)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rewards": torch.tensor([g.rewards[i] for g, i in rows], dtype=torch.float32),
        "advantages": torch.tensor(advantages or [0.0] * len(rows), dtype=torch.float32),
        "weights": torch.tensor([g.weights[i] for g, i in rows], dtype=torch.float32),
        "pass_rate": torch.tensor([g.pass_rate for g, _ in rows], dtype=torch.float32),
        "group_index": torch.tensor(group_index, dtype=torch.long),
        "problem_ids": [g.spec.problem.problem_id for g, _ in rows],
        "skills": [g.spec.problem.skill for g, _ in rows],
        "kinds": [g.spec.kind for g, _ in rows],
        "prompts": [g.spec.student_prompt for g, _ in rows],
        "completions": [g.texts[i] for g, i in rows],
    }
    if any(g.spec.teacher_prompt is not None for g in groups):
        teacher_prompts = [tokenize(g.spec.teacher_prompt or g.spec.student_prompt) for g, _ in rows]
        t_ids, t_attn, t_resp = _pack(teacher_prompts, responses, pad_token_id)
    else:
        t_ids, t_attn, t_resp = input_ids, attention_mask, response_mask
    batch.update(teacher_input_ids=t_ids, teacher_attention_mask=t_attn, teacher_response_mask=t_resp)
    if all(g.sampling_logprobs is not None for g in groups):
        logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)
        for row, (g, i) in enumerate(rows):
            start = len(prompts[row])
            lp = g.sampling_logprobs[i]  # type: ignore[index]
            logprobs[row, start : start + len(lp)] = torch.tensor(lp)
        batch["sampling_logprobs"] = logprobs
    return batch
