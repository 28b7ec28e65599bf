"""The typed batches of a step: :class:`RolloutBatch` for training, :class:`EvalBatch` for validation.

Shapes: ``B`` rows (one per completion), ``T`` positions (prompt + completion, right-padded).
Lightning moves both to the device (it recurses into dataclasses); lists and scalars stay as they
are.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from lit_zpd.loss_config import LossConfig
from lit_zpd.rollout.plan import DataSource, RolloutGroup


@dataclass
class RolloutBatch:
    """One optimizer step's rows, sampled from the current student (or written by the teacher or
    the references).

    Args:
        input_ids: ``(B, T)`` student prompt followed by the completion.
        attention_mask: ``(B, T)`` 1 on real tokens.
        response_mask: ``(B, T)`` 1 on completion tokens.
        teacher_input_ids: ``(B, T')`` the same completion after the teacher's prompt (a privileged
            context when a prompt has one; otherwise the student's tensors themselves).
        teacher_attention_mask: ``(B, T')``.
        teacher_response_mask: ``(B, T')``; selects exactly as many tokens per row as
            ``response_mask``, in the same order.
        sampling_logprobs: ``(B, T)`` log-probabilities of the completion tokens under the weights
            that sampled them, at ``sampling_temperature``, aligned with ``input_ids``; ``None``
            for teacher or reference responses.
        rewards: ``(B,)`` verifier score.
        advantages: ``(B,)`` from the rollout's groups (zeros off-policy).
        weights: ``(B,)`` per-sample loss weight, the product of the hooks' factors.
        pass_rate: ``(B,)`` pass rate of the row's own group.
        group_index: ``(B,)`` the row's group within the rollout (before minibatching).
        problem_ids: ``B`` problem ids.
        skills: ``B`` skills.
        kinds: ``B`` prompt kinds (``plain``, ``bcq``, ``ncq``).
        prompts: ``B`` student prompt texts.
        completions: ``B`` decoded completions.
        source: Who wrote the completions: ``student``, ``teacher`` or ``reference``.
        sampling_temperature: Temperature of ``sampling_logprobs`` (1 off-policy).
        policy_version: Optimizer steps taken by the weights that sampled the rollout.
        rollout_index: Which rollout of the run the rows come from.
        batch_index: Which optimizer step of the run trains on them (the training stream's index);
            equal to ``rollout_index`` unless ``data.ppo_minibatches`` > 1.
        minibatch_index: Position among the rollout's minibatches, from 0.
        num_minibatches: How many minibatches the rollout is served as.
        loss: The loss to train with (a hook's per-step setting); ``None``: the module's.
        metrics: Per-rollout scalars (hook counters, token totals), logged once per rollout.
        histograms: Per-rollout tensors for TensorBoard histograms.
        extras: Fields added by hooks (declared as ``extras.<key>`` controls); a tensor whose
            first dimension is ``B`` is split with the rows.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    teacher_input_ids: Tensor
    teacher_attention_mask: Tensor
    teacher_response_mask: Tensor
    sampling_logprobs: Tensor | None
    rewards: Tensor
    advantages: Tensor
    weights: Tensor
    pass_rate: Tensor
    group_index: Tensor
    problem_ids: list[str]
    skills: list[str]
    kinds: list[str]
    prompts: list[str]
    completions: list[str]
    source: DataSource
    sampling_temperature: float = 1.0
    policy_version: int = 0
    rollout_index: int = 0
    batch_index: int = 0
    minibatch_index: int = 0
    num_minibatches: int = 1
    loss: LossConfig | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def first_minibatch(self) -> bool:
        return self.minibatch_index == 0

    @property
    def last_minibatch(self) -> bool:
        """True on the rollout's last minibatch: callbacks acting between rollouts check it."""
        return self.minibatch_index == self.num_minibatches - 1

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch with its tensor fields, extras and histograms on ``device``, everything else
        shared. A tensor held by two fields (the teacher's view of an unprivileged batch) stays
        one tensor, so ``teacher_input_ids is input_ids`` keeps telling that the teacher reads the
        student's prompt. (Lightning's generic transfer walks every list of strings instead.)"""
        moved: dict[int, Tensor] = {}

        def move(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return value
            if id(value) not in moved:
                moved[id(value)] = value.to(device)
            return moved[id(value)]

        changes = {f.name: move(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(
            self, **changes,
            extras={k: move(v) for k, v in self.extras.items()},
            histograms={k: move(v) for k, v in self.histograms.items()},
        )

    def split(self, parts: int, seed: object) -> list[RolloutBatch]:
        """``parts`` row subsets (PPO minibatches), rows shuffled by a stream seeded with ``seed``.

        Row fields are split; scalars, ``metrics`` and ``histograms`` are shared (the
        ``first_minibatch`` is the one that logs them).
        """
        if parts == 1:
            return [self]
        if self.size < parts:
            raise RuntimeError(f"rollout {self.rollout_index} has {self.size} rows, fewer than data.ppo_minibatches={parts}")
        order = list(range(self.size))
        random.Random(repr(seed)).shuffle(order)
        return [self.take(sorted(order[k::parts]), minibatch_index=k, num_minibatches=parts) for k in range(parts)]

    def take(self, rows: list[int], **overrides: Any) -> RolloutBatch:
        """The batch of ``rows`` only (row fields indexed, the others shared), with ``overrides``."""
        n = self.size
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                value = {k: _take_rows(v, rows, n) for k, v in value.items()}
            elif f.name not in ("metrics", "histograms"):
                value = _take_rows(value, rows, n)
            changes[f.name] = value
        return replace(self, **(changes | overrides))


def _take_rows(value: Any, rows: list[int], n_rows: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return value[rows]
    if isinstance(value, list) and len(value) == n_rows:
        return [value[i] for i in rows]
    return value


@dataclass
class EvalBatch:
    """Validation results of a batch of problems.

    Args:
        problem_ids: ``B`` ids.
        skills: ``B`` skills.
        prompts: ``B`` prompt texts.
        greedy_correct: ``(B,)`` 1.0 where the greedy completion is correct.
        greedy_texts: ``B`` greedy completions.
        sample_pass_rate: ``(B,)`` mean correctness over ``eval_samples`` samples; ``None`` when
            ``data.eval_samples`` is 0.
    """

    problem_ids: list[str]
    skills: list[str]
    prompts: list[str]
    greedy_correct: Tensor
    greedy_texts: list[str]
    sample_pass_rate: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.problem_ids)

    def take(self, rows: list[int]) -> EvalBatch:
        """The results of ``rows`` only, in that order."""
        return replace(self, **{f.name: _take_rows(getattr(self, f.name), rows, self.size) for f in fields(self)})

    @staticmethod
    def concat(batches: list[EvalBatch]) -> EvalBatch:
        """One batch of all rows, in order."""
        rates = [b.sample_pass_rate for b in batches]
        return EvalBatch(
            problem_ids=[p for b in batches for p in b.problem_ids],
            skills=[s for b in batches for s in b.skills],
            prompts=[p for b in batches for p in b.prompts],
            greedy_correct=torch.cat([b.greedy_correct for b in batches]) if batches else torch.zeros(0),
            greedy_texts=[t for b in batches for t in b.greedy_texts],
            sample_pass_rate=torch.cat(rates) if batches and all(r is not None for r in rates) else None,  # type: ignore[arg-type]
        )


def pack_rows(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + response`` rows: (input_ids, attention_mask, response_mask), each (B, T).

    The response follows its prompt directly (no padding between them), so a row's response
    tokens sit at the same offsets from the prompt's end whatever the prompt's length."""
    width = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[row, : len(p) + len(r)] = 1
        response_mask[row, len(p) : len(p) + len(r)] = 1
    return input_ids, attention_mask, response_mask


def build_batch(
    groups: list[RolloutGroup],
    encode_prompt: Callable[[str], list[int]],
    pad_token_id: int,
    source: DataSource,
    advantages: list[float] | None = None,
) -> RolloutBatch:
    """The rollout's rows, one per completion, in group order.

    Args:
        groups: Scored groups, in order.
        encode_prompt: Prompt text to token ids (:meth:`RolloutContext.encode_prompt`).
        pad_token_id: Padding id.
        source: Who wrote the completions.
        advantages: One advantage per row; zeros if ``None``.
    """
    rows = [(g, i) for g in groups for i in range(len(g.token_ids))]
    responses = [g.token_ids[i] for g, i in rows]
    student_prompts = {id(g): encode_prompt(g.spec.student_prompt) for g in groups}
    prompts = [student_prompts[id(g)] for g, _ in rows]
    input_ids, attention_mask, response_mask = pack_rows(prompts, responses, pad_token_id)
    if any(g.spec.teacher_prompt is not None for g in groups):
        teacher_prompts = [encode_prompt(g.spec.teacher_prompt or g.spec.student_prompt) for g, _ in rows]
        t_ids, t_attn, t_resp = pack_rows(teacher_prompts, responses, pad_token_id)
    else:
        t_ids, t_attn, t_resp = input_ids, attention_mask, response_mask
    logprobs = None
    if groups and all(g.sampling_logprobs is not None for g in groups):
        logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)
        for row, (g, i) in enumerate(rows):
            start = len(prompts[row])
            lp = g.sampling_logprobs[i]  # type: ignore[index]
            logprobs[row, start : start + len(lp)] = torch.tensor(lp)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        teacher_input_ids=t_ids,
        teacher_attention_mask=t_attn,
        teacher_response_mask=t_resp,
        sampling_logprobs=logprobs,
        rewards=torch.tensor([g.rewards[i] for g, i in rows], dtype=torch.float32),
        advantages=torch.tensor(advantages or [0.0] * len(rows), dtype=torch.float32),
        weights=torch.tensor([g.weights[i] for g, i in rows], dtype=torch.float32),
        pass_rate=torch.tensor([g.pass_rate for g, _ in rows], dtype=torch.float32),
        group_index=torch.tensor([k for k, g in enumerate(groups) for _ in g.token_ids], dtype=torch.long),
        problem_ids=[g.spec.problem.problem_id for g, _ in rows],
        skills=[g.spec.problem.skill for g, _ in rows],
        kinds=[g.spec.kind for g, _ in rows],
        prompts=[g.spec.student_prompt for g, _ in rows],
        completions=[g.texts[i] for g, i in rows],
        source=source,
    )
