"""Loss terms as pure functions.

Shapes: ``N`` tokens (flattened), ``B`` samples, ``T`` positions, ``V`` vocabulary, ``H`` hidden.
Divergences and log-probabilities are computed in float32 whatever the model dtype.

Divergences between a student and a teacher are per token; the caller masks and aggregates with
:func:`aggregate`, whose per-token coefficients are :func:`token_weights`. Training computes every
term from the final hidden states and the output heads instead of logits, fused
(:func:`linear_divergence`, :func:`linear_logprob_loss`): chunk by chunk, the loss and its
gradients with respect to the hidden states and the head are computed in the forward pass (the
gradient in the logits is closed-form), so the logits exist for one chunk at a time, nothing is
recomputed in backward, and peak memory is ``chunk_size x V`` rather than ``N x V``. The plain
functions on logits are the reference the fused ones are tested against.

Conventions (TRL's generalized JSD): ``M = beta * p_T + (1 - beta) * p_S``,
``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``; at the endpoints the divergence is
defined as forward KL(p_T || p_S) for ``beta = 0`` and reverse KL(p_S || p_T) for ``beta = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Aggregation = Literal["sample", "token"]


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` in float32. ``(..., V) -> (..., V)``."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_entries(log_p: Tensor, log_q: Tensor) -> Tensor:
    """The vocabulary entries ``p(v) * (log p(v) - log q(v))`` of ``KL(p || q)``. ``(N, V) -> (N, V)``."""
    return log_p.exp() * (log_p - log_q)


def log_mixture(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """``log M`` with ``M = beta * p_T + (1 - beta) * p_S``, for ``0 < beta < 1``. ``(N, V) -> (N, V)``."""
    return torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)


def divergence_entries(log_s: Tensor, log_t: Tensor, beta: float, log_m: Tensor | None = None) -> Tensor:
    """Per vocabulary entry terms of the generalized JSD, from log-probabilities; they sum over
    ``V`` to the divergence. ``log_m`` is :func:`log_mixture` when the caller has it already.
    ``(N, V), (N, V) -> (N, V)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_entries(log_t, log_s)
    if beta == 1.0:
        return _kl_entries(log_s, log_t)
    log_m = log_mixture(log_s, log_t, beta) if log_m is None else log_m
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


# ------------------------------------------------------------------------ fused linear losses

DEFAULT_CHUNK_BYTES = 512 * 2**20
"""Working memory one chunk of a fused loss may use (the chunk size's default)."""

_LIVE_ROWS = 8  # float32 (n, V) tensors alive at once in a chunk's closed-form gradient


def default_chunk_size(vocab: int, hidden: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's float32 logits, probabilities and gradient
    (``_LIVE_ROWS x vocab`` floats per token) and its hidden-state rows fit in ``budget_bytes``:
    520 tokens at a 32k vocabulary, 340 at SmolLM2's 49,152, 110 at Qwen's 151,936. Measured at
    151,936 (``scripts/bench_divergence.py``): 55-token chunks cost about 1.2x the plain path's time,
    110-128-token chunks about 1.0x."""
    return max(1, budget_bytes // (4 * (_LIVE_ROWS * vocab + 2 * hidden)))


def _chunks(n: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


class LinearHead:
    """An output head ``logits = hidden @ weight[:vocab].T + bias[:vocab]`` as the fused losses
    read it: its weight is used directly, so its gradient can be accumulated chunk by chunk.

    Args:
        weight: ``(V', H)`` with ``V' >= vocab`` (heads are often padded past the tokenizer).
        bias: ``(V',)`` or ``None``.
        vocab: Rows in use; ``V'`` if ``None``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, vocab: int | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.vocab = weight.shape[0] if vocab is None else vocab
        if not 0 < self.vocab <= weight.shape[0]:
            raise ValueError(f"vocab must be in [1, {weight.shape[0]}], got {self.vocab}")

    @staticmethod
    def of(module: torch.nn.Module, vocab: int | None = None) -> LinearHead:
        """The head of a linear layer (a model's ``get_output_embeddings()``)."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(module, torch.nn.Linear):
            raise TypeError(
                f"the output head is a {type(module).__name__}, not a plain linear layer; the fused losses read its "
                "weight directly (with LoRA, leave lm_head out of model.lora.target_modules)"
            )
        return LinearHead(weight, module.bias, vocab)

    def __call__(self, hidden: Tensor) -> Tensor:
        """Float32 logits ``(n, vocab)`` from ``(n, H)``, computed in the weight's dtype."""
        out = hidden.to(self.weight.dtype) @ self.weight[: self.vocab].T
        if self.bias is not None:
            out = out + self.bias[: self.vocab]
        return out.float()


ChunkLoss = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None, Tensor]]
"""``(logits (n, V) float32, rows, want_grad) -> (loss of the rows, d loss / d logits (n, V) or
None, per-token values (k, n))``: one chunk of a fused loss, its gradient in closed form."""


def _fused_pass(
    hidden: Tensor, head: LinearHead, chunk_loss: ChunkLoss, chunk_size: int, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Runs ``chunk_loss`` over the chunks; with ``needs`` (hidden, weight, bias) it accumulates
    the gradients of the summed loss into buffers allocated once."""
    grad_h = torch.zeros_like(hidden) if needs[0] else None
    grad_w = torch.zeros_like(head.weight) if needs[1] else None
    grad_b = torch.zeros_like(head.bias) if needs[2] and head.bias is not None else None
    weight = head.weight[: head.vocab]
    loss = hidden.new_zeros((), dtype=torch.float32)
    values = []
    device = hidden.device.type
    # Autocast would cast the buffers' in-place updates; the head runs in its weight's dtype.
    with torch.autocast(device, enabled=False):
        for rows in _chunks(hidden.shape[0], chunk_size):
            h = hidden[rows].to(weight.dtype)
            part, grad_z, value = chunk_loss(head(h), rows, any(needs))
            loss = loss + part
            values.append(value)
            if grad_z is None:
                continue
            grad_z = grad_z.to(weight.dtype)  # (n, V)
            if grad_h is not None:
                grad_h[rows] = grad_z @ weight
            if grad_w is not None:
                grad_w[: head.vocab].addmm_(grad_z.T, h)
            if grad_b is not None:
                grad_b[: head.vocab] += grad_z.sum(0)
    return loss, torch.cat(values, dim=-1) if values else hidden.new_zeros((0, 0)), grad_h, grad_w, grad_b


class _FusedLinearLoss(torch.autograd.Function):
    """Loss and gradients in one chunked forward pass; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int, chunk_loss: ChunkLoss, chunk_size: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        loss, values, *grads = _fused_pass(hidden, LinearHead(weight, bias, vocab), chunk_loss, chunk_size, needs)  # type: ignore[arg-type]
        ctx.grads = grads
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("a fused linear loss was backpropagated twice; its gradients are released after the first")
        grads, ctx.grads = ctx.grads, None
        scale = None if bool(grad_loss == 1) else grad_loss
        out = [g if g is None or scale is None else g * scale.to(g.dtype) for g in grads]
        return (*out, None, None, None)


def fused_linear_loss(hidden: Tensor, head: LinearHead, chunk_loss: ChunkLoss, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """A loss over the logits ``head(hidden)`` computed chunk by chunk, with its gradients with
    respect to ``hidden`` and the head computed in the same pass: the logits of a chunk are built
    once and freed, no chunk recomputes anything in backward, and the head's gradient is one
    buffer. ``chunk_size`` ``None`` means :func:`default_chunk_size`.

    Returns:
        The scalar loss (differentiable), and ``(k, N)`` the chunks' per-token values (detached).
    """
    chunk_size = default_chunk_size(head.vocab, hidden.shape[-1]) if chunk_size is None else chunk_size
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)):
        return _FusedLinearLoss.apply(hidden, head.weight, head.bias, head.vocab, chunk_loss, chunk_size)
    loss, values, *_ = _fused_pass(hidden, head, chunk_loss, chunk_size, (False, False, False))
    return loss, values


def _entry_slopes(log_s: Tensor, p_s: Tensor, log_t: Tensor, beta: float, log_m: Tensor | None) -> Tensor:
    """``d e_v / d log p_S(v)`` of each entry of :func:`divergence_entries`: an entry depends on the
    student only through its own log-probability. ``p_s`` is ``exp(log_s)``, ``log_m`` the
    mixture for ``0 < beta < 1``. ``(n, V) -> (n, V)``."""
    if beta == 0.0:  # p_T (log p_T - log p_S)
        return -log_t.exp()
    if beta == 1.0:  # p_S (log p_S - log p_T)
        return p_s * (log_s - log_t + 1)
    return (1 - beta) * p_s * (log_s - log_m)


def linear_divergence(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_hidden: Tensor,
    teacher_head: LinearHead,
    token_weights: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    entry_clip: float | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted sum over tokens of :func:`generalized_jsd`, from hidden states, fused.

    The gradient with respect to the student's logits is closed-form: with ``a_v`` the slope of
    entry ``v`` in its own student log-probability (zero where ``entry_clip`` binds),
    ``d/dz = (a - p_S * sum(a)) / temperature``. The teacher's logits of a chunk are built inside
    it, without gradient, so they are never all alive.

    Args:
        student_hidden: ``(N, H_s)``.
        student_head: The student's head.
        teacher_hidden: ``(N, H_t)``, no gradient needed.
        teacher_head: The teacher's head (same ``vocab``).
        token_weights: ``(N,)`` the coefficient of each token in the loss (:func:`token_weights`).
        beta: As in :func:`generalized_jsd`.
        temperature: As in :func:`generalized_jsd`.
        entry_clip: As in :func:`generalized_jsd`.
        chunk_size: Tokens per chunk; ``None``: :func:`default_chunk_size`.

    Returns:
        The scalar loss ``sum_i w_i D_i``; ``(N,)`` the divergence per token (with the clip) and
        ``(N,)`` without it, both detached.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if teacher_head.vocab != student_head.vocab:
        raise ValueError(f"the teacher's head has {teacher_head.vocab} tokens, the student's {student_head.vocab}")

    def chunk(z: Tensor, rows: slice, want_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        log_s = log_probs(z, temperature)
        with torch.no_grad():
            log_t = log_probs(teacher_head(teacher_hidden[rows]), temperature)
        log_m = log_mixture(log_s, log_t, beta) if 0.0 < beta < 1.0 else None  # shared with the slopes
        entries = divergence_entries(log_s, log_t, beta, log_m)
        unclipped = entries.sum(-1)
        kept = None if entry_clip is None else entries <= entry_clip
        per_token = unclipped if kept is None else entries.clamp(max=entry_clip).sum(-1)
        del entries
        weights = token_weights[rows].float()
        grad_z = None
        if want_grad:
            p_s = log_s.exp()
            slopes = _entry_slopes(log_s, p_s, log_t, beta, log_m)
            if kept is not None:
                slopes = slopes * kept
            grad_z = (slopes - p_s * slopes.sum(-1, keepdim=True)) * (weights / temperature)[:, None]
        return (weights * per_token).sum(), grad_z, torch.stack([per_token, unclipped])

    loss, values = fused_linear_loss(student_hidden, student_head, chunk, chunk_size)
    if values.numel() == 0:
        values = student_hidden.new_zeros((2, 0), dtype=torch.float32)
    return loss, values[0], values[1]


TokenLoss = Callable[[Tensor, slice], Tensor]
"""``(log-probabilities (n,), rows) -> the rows' scalar loss``, elementwise in the tokens."""


def linear_logprob_loss(
    hidden: Tensor,
    head: LinearHead,
    targets: Tensor,
    token_loss: TokenLoss,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A loss of the target tokens' log-probabilities (SFT's ``-sum w log p``, a clipped policy
    surrogate), from hidden states, fused.

    ``token_loss`` must treat tokens independently; its slope in each log-probability is taken by
    autograd on the chunk's ``(n,)`` values, and ``d log p(y) / d z = (onehot(y) - p) / temperature``.

    Args:
        hidden: ``(N, H)``.
        head: The head.
        targets: ``(N,)`` token ids.
        token_loss: The loss of a chunk's log-probabilities.
        temperature: Softening of the distribution.
        chunk_size: Tokens per chunk; ``None``: :func:`default_chunk_size`.

    Returns:
        The scalar loss, and ``(N,)`` the log-probabilities (detached).
    """

    def chunk(z: Tensor, rows: slice, want_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        log_p = log_probs(z, temperature)
        y = targets[rows].unsqueeze(-1)
        logp = log_p.gather(-1, y).squeeze(-1)
        if not want_grad:
            return token_loss(logp, rows).float(), None, logp[None]
        leaf = logp.detach().requires_grad_(True)
        with torch.enable_grad():
            part = token_loss(leaf, rows).float()
        (slope,) = torch.autograd.grad(part, leaf, allow_unused=True, materialize_grads=True)
        grad_z = log_p.exp_().mul_(-slope[:, None]).scatter_add_(-1, y, slope[:, None]).div_(temperature)
        return part.detach(), grad_z, logp[None]

    loss, values = fused_linear_loss(hidden, head, chunk, chunk_size)
    return loss, values[0] if values.numel() else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def linear_token_logprobs(hidden: Tensor, head: LinearHead, targets: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """:func:`token_logprobs` from hidden states, chunk by chunk, without gradient. ``(N, H) -> (N,)``."""
    return linear_logprob_loss(hidden, head, targets, lambda logp, rows: logp.new_zeros(()), temperature, chunk_size)[1]


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


def token_weights(mask: Tensor, weights: Tensor | None = None, mode: Aggregation = "sample") -> Tensor:
    """The coefficient of every token in :func:`aggregate`: the scalar loss is
    ``(token_weights * per_token).sum()``, 0 on tokens that do not count.

    Args:
        mask: ``(B, T)``, 1 on tokens that count.
        weights: ``(B,)`` per-sample weights; ``None`` means 1.
        mode: ``"sample"``: ``w_i / (T_i * B)``, the mean over samples of ``w_i * token-mean_i``;
            ``"token"``: ``w_i / sum_i T_i`` (DAPO / GKD token-level normalisation).

    Returns:
        ``(B, T)`` float32.
    """
    mask = mask.float()
    if weights is None:
        weights = mask.new_ones(mask.shape[0])
    weights = weights.float()[:, None]
    if mode == "token":
        return mask * weights / mask.sum().clamp_min(1)
    if mode == "sample":
        return mask * weights / (mask.sum(-1, keepdim=True).clamp_min(1) * max(1, mask.shape[0]))
    raise ValueError(f"aggregation must be 'sample' or 'token', got {mode!r}")


def aggregate(
    per_token: Tensor, mask: Tensor, weights: Tensor | None = None, mode: Aggregation = "sample"
) -> Tensor:
    """Reduce a per-token loss to a scalar with the coefficients of :func:`token_weights`.

    Args:
        per_token: ``(B, T)``.
        mask: ``(B, T)``, 1 on tokens that count.
        weights: ``(B,)`` per-sample weights; ``None`` means 1.
        mode: ``"sample"`` or ``"token"`` (see :func:`token_weights`).

    Returns:
        A scalar; exactly 0 when no token is counted.
    """
    coefficients = token_weights(mask, weights, mode).to(per_token.dtype)
    return (coefficients * per_token.where(mask.bool(), 0)).sum()
