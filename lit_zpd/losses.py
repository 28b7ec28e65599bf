"""Loss terms as pure functions.

Shapes: ``N`` tokens (flattened), ``B`` samples, ``T`` positions, ``V`` vocabulary, ``H`` hidden.
Divergences and log-probabilities are computed in float32 whatever the model dtype.

Divergences between a student and a teacher are per token; the caller masks and aggregates with
:func:`aggregate`. Over a large vocabulary, :func:`chunked_token_divergence` and
:func:`chunked_token_logprobs` take hidden states and the output heads instead of logits, build the
logits chunk by chunk and recompute them in backward, so peak memory is ``chunk_size x V`` rather
than ``N x V``.

Conventions (TRL's generalized JSD): ``M = beta * p_T + (1 - beta) * p_S``,
``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``; at the endpoints the divergence is
defined as forward KL(p_T || p_S) for ``beta = 0`` and reverse KL(p_S || p_T) for ``beta = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Aggregation = Literal["sample", "token"]
Head = Callable[[Tensor], Tensor]


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` in float32. ``(..., V) -> (..., V)``."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_entries(log_p: Tensor, log_q: Tensor) -> Tensor:
    """The vocabulary entries ``p(v) * (log p(v) - log q(v))`` of ``KL(p || q)``. ``(N, V) -> (N, V)``."""
    return log_p.exp() * (log_p - log_q)


def divergence_entries(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Per vocabulary entry terms of the generalized JSD, from log-probabilities; they sum over
    ``V`` to the divergence. ``(N, V), (N, V) -> (N, V)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_entries(log_t, log_s)
    if beta == 1.0:
        return _kl_entries(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * _kl_entries(log_t, log_m) + (1 - beta) * _kl_entries(log_s, log_m)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    entry_clip: float | None = None,
) -> Tensor:
    """Per-token generalized Jensen-Shannon divergence.

    Args:
        student_logits: ``(N, V)``.
        teacher_logits: ``(N, V)``, no gradient needed.
        beta: Mixture weight of the teacher; 0 gives forward KL, 1 reverse KL.
        temperature: Both distributions are softened by it.
        entry_clip: Clip each vocabulary entry's term at this value before the sum over the
            vocabulary (``clamp(max=entry_clip)``; negative entries are kept), as OPSD's current
            recipe does (0.05); ``None`` sums the terms unclipped. A clipped entry passes no
            gradient.

    Returns:
        ``(N,)`` divergence per token.
    """
    return _clipped_sum(divergence_entries(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), beta), entry_clip)


def _clipped_sum(entries: Tensor, entry_clip: float | None) -> Tensor:
    return (entries if entry_clip is None else entries.clamp(max=entry_clip)).sum(-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token ``KL(p_T || p_S)`` (mode covering). ``(N, V), (N, V) -> (N,)``."""
    return generalized_jsd(student_logits, teacher_logits, 0.0, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token ``KL(p_S || p_T)`` (mode seeking). ``(N, V), (N, V) -> (N,)``."""
    return generalized_jsd(student_logits, teacher_logits, 1.0, temperature)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token. ``(N, V), (N,) -> (N,)``."""
    return log_probs(logits, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunks(n: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def chunked_token_divergence(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entry_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`generalized_jsd` from hidden states, ``chunk_size`` tokens at a time.

    Args:
        student_hidden: ``(N, H_s)`` final hidden states of the student.
        student_head: Maps ``(n, H_s)`` to logits ``(n, V)``; its logits are recomputed in backward.
        teacher_hidden: ``(N, H_t)``; the teacher head runs without gradient.
        teacher_head: Maps ``(n, H_t)`` to ``(n, V)``.
        beta: As in :func:`generalized_jsd`.
        temperature: As in :func:`generalized_jsd`.
        chunk_size: Tokens per chunk.
        entry_clip: As in :func:`generalized_jsd`.

    Returns:
        ``(N,)`` divergence per token (with ``entry_clip``), equal to the unchunked computation,
        and ``(N,)`` the same divergence without the clip, detached (a diagnostic: the
        student-teacher mismatch the clip hides).
    """

    def piece(s_hidden: Tensor, t_logits: Tensor) -> Tensor:
        s_logp, t_logp = log_probs(student_head(s_hidden), temperature), log_probs(t_logits, temperature)
        entries = divergence_entries(s_logp, t_logp, beta)
        clipped = _clipped_sum(entries, entry_clip)
        return torch.stack([clipped, (clipped if entry_clip is None else entries.sum(-1)).detach()])

    out = []
    for sl in _chunks(student_hidden.shape[0], chunk_size):
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[sl])
        out.append(checkpoint(piece, student_hidden[sl], t_logits, use_reentrant=False))
    if not out:
        empty = student_hidden.new_zeros(0)
        return empty, empty
    both = torch.cat(out, dim=1)
    return both[0], both[1].detach()


def chunked_token_logprobs(
    hidden: Tensor, head: Head, targets: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """:func:`token_logprobs` from hidden states, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``(N, H)``.
        head: Maps ``(n, H)`` to logits ``(n, V)``; recomputed in backward.
        targets: ``(N,)`` token ids.
        temperature: Softening of the distribution.
        chunk_size: Tokens per chunk.

    Returns:
        ``(N,)`` log-probabilities.
    """

    def piece(h: Tensor, y: Tensor) -> Tensor:
        return token_logprobs(head(h), y, temperature)

    out = [
        checkpoint(piece, hidden[sl], targets[sl], use_reentrant=False)
        for sl in _chunks(hidden.shape[0], chunk_size)
    ]
    return torch.cat(out) if out else hidden.new_zeros(0)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> Tensor:
    """Per-token PPO clipped surrogate, to be minimised.

    ``ratio = exp(logprobs - old_logprobs)``; loss ``-min(ratio * A, clip(ratio, 1 - clip_low,
    1 + clip_high) * A)``. With ``dual_clip = c > 1`` the loss of a negative-advantage token is
    further capped at ``-c * A`` so a huge ratio cannot dominate (dual-clip PPO).

    Args:
        logprobs: ``(B, T)`` current policy log-probabilities of the sampled tokens.
        old_logprobs: ``(B, T)`` log-probabilities under the sampling policy.
        advantages: ``(B, T)`` or ``(B, 1)``; treated as constants.
        clip_low: Lower clip range ``eps_low``.
        clip_high: Upper clip range ``eps_high``.
        dual_clip: The constant ``c`` of dual clip, or ``None``.

    Returns:
        ``(B, T)`` per-token loss.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def _group_centred(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``r - mean_group`` per sample, exactly 0 in groups whose rewards are all equal.

    Returns:
        ``centred`` (B,), ``spread`` (B,) bool: the sample's group has unequal rewards,
        ``inverse`` (B,): group position of each sample, ``counts`` (G,): samples per group.
    """
    rewards = rewards.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = rewards.new_zeros(len(counts)).index_add_(0, inverse, rewards)
    mean = (sums / counts)[inverse]
    # sum / count rounds (7 x 0.1 has a mean != 0.1 in float32); compare extremes for exact zeros.
    high = rewards.new_full((len(counts),), -math.inf).scatter_reduce(0, inverse, rewards, "amax")
    low = rewards.new_full((len(counts),), math.inf).scatter_reduce(0, inverse, rewards, "amin")
    spread = (high != low)[inverse]
    return torch.where(spread, rewards - mean, 0.0), spread, inverse, counts


def group_advantages(
    rewards: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)``. ``(B,), (B,) -> (B,)``.

    Groups whose rewards are all equal get exactly 0. ``std`` is the population std of the group.
    """
    centred, _, inverse, counts = _group_centred(rewards, group_ids)
    if not scale_by_std:
        return centred
    var = centred.new_zeros(len(counts)).index_add_(0, inverse, centred**2) / counts
    return centred / (var.sqrt()[inverse] + eps)


def reinforce_pp_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ advantages with a group baseline (ZPPO). ``(B,), (B,) -> (B,)``.

    ``A' = r - mean_group``, then ``(A' - mean) / (std + eps)`` with the mean and population std
    taken over the samples of groups whose rewards differ. Groups whose rewards are all equal
    (all correct, all wrong) carry no signal and keep exactly 0, and they do not shrink the
    batch statistics either.
    """
    centred, spread, _, _ = _group_centred(rewards, group_ids)
    if not spread.any():
        return centred
    kept = centred[spread]
    return centred.masked_scatter(spread, (kept - kept.mean()) / (kept.std(correction=0) + eps))


def sampled_token_kl_advantage(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """On-policy distillation's per-token advantage ``-(log p_S(y_t) - log p_T(y_t))``.

    Its expectation under the student is minus the reverse KL, so maximising it with a policy
    gradient minimises ``KL(p_S || p_T)`` on the student's own samples. ``(B, T) -> (B, T)``.
    """
    return -(student_logprobs - teacher_logprobs).detach()


def aggregate(
    per_token: Tensor, mask: Tensor, weights: Tensor | None = None, mode: Aggregation = "sample"
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Args:
        per_token: ``(B, T)``.
        mask: ``(B, T)``, 1 on tokens that count.
        weights: ``(B,)`` per-sample weights; ``None`` means 1.
        mode: ``"sample"``: mean over samples of ``w_i * token-mean_i``; ``"token"``: the sum of
            ``w_i * loss_it`` over all counted tokens divided by their number (DAPO / GKD
            token-level normalisation).

    Returns:
        A scalar; exactly 0 when no token is counted.
    """
    mask = mask.to(per_token.dtype)
    if weights is None:
        weights = torch.ones(per_token.shape[0], dtype=per_token.dtype, device=per_token.device)
    per_sample = (per_token * mask).sum(-1)
    tokens = mask.sum(-1)
    if mode == "token":
        return (weights * per_sample).sum() / tokens.sum().clamp_min(1)
    if mode == "sample":
        return (weights * per_sample / tokens.clamp_min(1)).mean() if per_token.shape[0] else per_token.sum()
    raise ValueError(f"aggregation must be 'sample' or 'token', got {mode!r}")
