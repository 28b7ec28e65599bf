"""Loss functions against independent computations written with plain torch ops or by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lit_zpd.losses import (
    aggregate,
    LinearHead,
    clipped_policy_loss,
    default_chunk_size,
    forward_kl,
    generalized_jsd,
    group_advantages,
    reverse_kl,
    sampled_token_kl_advantage,
    linear_divergence,
    linear_logprob_loss,
    linear_token_logprobs,
    token_logprobs,
    token_weights,
)

torch.set_num_threads(1)


def _probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def _explicit_kl(p: Tensor, q: Tensor) -> Tensor:
    """``sum_v p * log(p / q)`` in probability space."""
    return (p * torch.log(p / q)).sum(-1)


def _explicit_jsd(s_logits: Tensor, t_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    p_s, p_t = _probs(s_logits, temperature), _probs(t_logits, temperature)
    m = beta * p_t + (1 - beta) * p_s
    return beta * _explicit_kl(p_t, m) + (1 - beta) * _explicit_kl(p_s, m)


def _explicit_clipped(s_logits: Tensor, t_logits: Tensor, beta: float, clip: float, temperature: float = 1.0) -> Tensor:
    """The generalized JSD with each vocabulary entry's term clamped at ``clip`` before the sum."""
    p_s, p_t = _probs(s_logits, temperature), _probs(t_logits, temperature)
    m = beta * p_t + (1 - beta) * p_s
    entries = beta * p_t * torch.log(p_t / m) + (1 - beta) * p_s * torch.log(p_s / m)
    if beta in (0.0, 1.0):  # the endpoints are the KLs by convention
        entries = p_t * torch.log(p_t / p_s) if beta == 0.0 else p_s * torch.log(p_s / p_t)
    return entries.clamp(max=clip).sum(-1)


def _close(actual: Tensor, expected: Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.fixture
def logits_pair() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g) * 2, torch.randn(3, 4, generator=g) * 2


# --------------------------------------------------------------------------------- divergences

# Two tokens, p_T = (1/2, 1/2), p_S = (1/4, 3/4); logits are log-probabilities.
# KL(T||S) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)                                 = 0.1438410362
# KL(S||T) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732867951 + 0.3040988311            = 0.1308120359
# beta 1/2: M = (3/8, 5/8); KL(T||M) = 1/2 ln(4/3) + 1/2 ln(4/5)                 = 0.0322692606
#                          KL(S||M) = 1/4 ln(2/3) + 3/4 ln(6/5)                  = 0.0353748906
#           JSD = (0.0322692606 + 0.0353748906) / 2                             = 0.0338220756
_HAND_T = torch.log(torch.tensor([[0.5, 0.5]]))
_HAND_S = torch.log(torch.tensor([[0.25, 0.75]]))


def test_hand_computed_values() -> None:
    _close(forward_kl(_HAND_S, _HAND_T), torch.tensor([0.1438410362]))
    _close(reverse_kl(_HAND_S, _HAND_T), torch.tensor([0.1308120359]))
    _close(generalized_jsd(_HAND_S, _HAND_T, beta=0.5), torch.tensor([0.0338220756]))
    # Clipped forward KL: entries 1/2 ln 2 = 0.3465735903 -> 0.05 and 1/2 ln(2/3) = -0.2027325541 kept.
    _close(generalized_jsd(_HAND_S, _HAND_T, beta=0.0, entry_clip=0.05), torch.tensor([0.05 - 0.2027325541]))


def test_kl_directions_match_explicit_formula(logits_pair: tuple[Tensor, Tensor]) -> None:
    s, t = logits_pair
    _close(forward_kl(s, t), _explicit_kl(_probs(t), _probs(s)))
    _close(reverse_kl(s, t), _explicit_kl(_probs(s), _probs(t)))
    assert not torch.allclose(forward_kl(s, t), reverse_kl(s, t))


def test_jsd_endpoints_are_the_two_kls(logits_pair: tuple[Tensor, Tensor]) -> None:
    s, t = logits_pair
    _close(generalized_jsd(s, t, beta=0.0), _explicit_kl(_probs(t), _probs(s)))
    _close(generalized_jsd(s, t, beta=1.0), _explicit_kl(_probs(s), _probs(t)))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_matches_probability_space_mixture(logits_pair: tuple[Tensor, Tensor], beta: float) -> None:
    s, t = logits_pair
    _close(generalized_jsd(s, t, beta=beta), _explicit_jsd(s, t, beta))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_swap_symmetry(logits_pair: tuple[Tensor, Tensor], beta: float) -> None:
    s, t = logits_pair
    _close(generalized_jsd(s, t, beta=beta), generalized_jsd(t, s, beta=1 - beta))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_identical_logits_give_zero_and_random_inputs_are_nonnegative(beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g)
    _close(generalized_jsd(x, x.clone(), beta=beta), torch.zeros(5))
    s, t = torch.randn(50, 7, generator=g) * 3, torch.randn(50, 7, generator=g) * 3
    d = generalized_jsd(s, t, beta=beta)
    assert d.shape == (50,)
    assert (d >= -1e-6).all()
    assert (d > 1e-4).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_temperature_divides_logits(logits_pair: tuple[Tensor, Tensor], beta: float) -> None:
    s, t = logits_pair
    tau = 0.7
    got = generalized_jsd(s, t, beta=beta, temperature=tau)
    _close(got, generalized_jsd(s / tau, t / tau, beta=beta))
    p_s, p_t = _probs(s, tau), _probs(t, tau)
    explicit = {0.0: _explicit_kl(p_t, p_s), 1.0: _explicit_kl(p_s, p_t)}.get(beta)
    _close(got, _explicit_jsd(s, t, beta, tau) if explicit is None else explicit)
    assert not torch.allclose(got, generalized_jsd(s, t, beta=beta))
    _close(forward_kl(s, t, temperature=tau), _explicit_kl(_probs(t, tau), _probs(s, tau)))


def test_float32_from_low_precision_logits(logits_pair: tuple[Tensor, Tensor]) -> None:
    s, t = logits_pair
    out = generalized_jsd(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    _close(out, _explicit_jsd(s.bfloat16().float(), t.bfloat16().float(), 0.5))


@pytest.mark.parametrize("beta", [-0.1, 1.1])
def test_beta_out_of_range_raises(logits_pair: tuple[Tensor, Tensor], beta: float) -> None:
    s, t = logits_pair
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, beta=beta)


# ------------------------------------------------------------------------------------ chunking

_N, _H, _V = 7, 8, 11


def _heads() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(2)
    return nn.Linear(_H, _V), nn.Linear(_H + 2, _V)


def _grads(out: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(out, inputs))


@pytest.mark.parametrize("entry_clip", [None, 0.05])
@pytest.mark.parametrize("chunk_size", [1, 3, _N, _N + 5])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_fused_divergence_equals_plain(chunk_size: int, beta: float, entry_clip: float | None) -> None:
    s_head, t_head = _heads()
    g = torch.Generator().manual_seed(3)
    s_hidden = torch.randn(_N, _H, generator=g, requires_grad=True)
    t_hidden = torch.randn(_N, _H + 2, generator=g)
    weights = torch.rand(_N, generator=g)
    inputs = [s_hidden, s_head.weight, s_head.bias]

    plain = generalized_jsd(s_head(s_hidden), t_head(t_hidden), beta, temperature=0.9, entry_clip=entry_clip)
    want = _grads((weights * plain).sum(), inputs)
    loss, per_token, unclipped = linear_divergence(
        s_hidden, LinearHead.of(s_head), t_hidden, LinearHead.of(t_head), weights, beta, 0.9, entry_clip, chunk_size
    )
    got = _grads(loss, inputs)

    _close(loss, (weights * plain).sum())
    _close(per_token, plain)
    _close(unclipped, generalized_jsd(s_head(s_hidden), t_head(t_hidden), beta, temperature=0.9))
    assert not per_token.requires_grad and not unclipped.requires_grad
    for a, b in zip(got, want, strict=True):
        assert a.abs().sum() > 0
        _close(a, b)


def test_fused_divergence_scales_with_the_upstream_gradient_and_reads_a_padded_head() -> None:
    """A head padded past the tokenizer (V' > V) and a loss used with a coefficient."""
    g = torch.Generator().manual_seed(8)
    s_head, t_head = nn.Linear(_H, _V + 3, bias=False), nn.Linear(_H, _V + 3, bias=False)
    hidden = torch.randn(_N, _H, generator=g, requires_grad=True)
    t_hidden = torch.randn(_N, _H, generator=g)
    weights = torch.rand(_N, generator=g)
    plain = generalized_jsd(s_head(hidden)[:, :_V], t_head(t_hidden)[:, :_V], 1.0)
    want = _grads(2.5 * (weights * plain).sum(), [hidden, s_head.weight])
    loss, _, _ = linear_divergence(hidden, LinearHead.of(s_head, _V), t_hidden, LinearHead.of(t_head, _V), weights, 1.0, chunk_size=4)
    got = _grads(2.5 * loss, [hidden, s_head.weight])
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    assert torch.equal(got[1][_V:], torch.zeros(3, _H))  # padding rows get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_entry_clip_against_an_explicit_reference(beta: float) -> None:
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, 9, generator=g) * 3, torch.randn(6, 9, generator=g) * 3
    clipped = generalized_jsd(s, t, beta, temperature=1.1, entry_clip=0.05)
    _close(clipped, _explicit_clipped(s, t, beta, 0.05, temperature=1.1))
    unclipped = generalized_jsd(s, t, beta, temperature=1.1)
    assert (clipped < unclipped - 1e-3).any()  # the clip binds on these logits
    # Off, or too high to bind, the clip changes nothing.
    _close(generalized_jsd(s, t, beta, temperature=1.1, entry_clip=None), unclipped)
    _close(generalized_jsd(s, t, beta, temperature=1.1, entry_clip=1e9), unclipped)


def test_entry_clip_keeps_negative_entries_and_stops_their_gradient_only_where_it_binds() -> None:
    s = _HAND_S.clone().requires_grad_(True)
    # Forward KL entries: 0.347 (clipped to 0.05) and -0.203 (kept).
    generalized_jsd(s, _HAND_T, 0.0, entry_clip=0.05).sum().backward()
    # Only the kept entry, p_T(1) * (log p_T(1) - log p_S(1)), passes a gradient:
    # d/ds of -1/2 log softmax(s)_1 = -1/2 (onehot_1 - p_S) = (1/8, -1/8).
    _close(s.grad, torch.tensor([[0.125, -0.125]]))


def test_fused_divergence_gives_teacher_no_gradient() -> None:
    s_head, t_head = _heads()
    loss, _, _ = linear_divergence(
        torch.randn(_N, _H), LinearHead.of(s_head), torch.randn(_N, _H + 2), LinearHead.of(t_head), torch.ones(_N), chunk_size=3
    )
    loss.backward()
    assert t_head.weight.grad is None
    assert s_head.weight.grad is not None


@pytest.mark.parametrize("chunk_size", [1, 3, _N, _N + 5])
def test_fused_logprob_losses_equal_plain(chunk_size: int) -> None:
    """SFT's weighted NLL and a clipped policy surrogate (non-linear in the log-probability)."""
    head, _ = _heads()
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(_N, _H, generator=g, requires_grad=True)
    targets = torch.randint(0, _V, (_N,), generator=g)
    weights = torch.rand(_N, generator=g)
    old = torch.log_softmax(torch.randn(_N, _V, generator=g), -1)[torch.arange(_N), targets]
    advantages = torch.randn(_N, generator=g)
    inputs = [hidden, head.weight, head.bias]

    plain = token_logprobs(head(hidden), targets, temperature=1.3)
    manual = torch.log_softmax(head(hidden).double() / 1.3, -1)[torch.arange(_N), targets]
    _close(plain, manual)
    losses = {
        "sft": (lambda lp, r: -(weights[r] * lp).sum()),
        "policy": (lambda lp, r: (weights[r] * clipped_policy_loss(lp, old[r], advantages[r], 0.1, 0.1)).sum()),
    }
    for name, token_loss in losses.items():
        want_loss = token_loss(token_logprobs(head(hidden), targets, temperature=1.3), slice(None))
        want = _grads(want_loss, inputs)
        loss, logprobs = linear_logprob_loss(hidden, LinearHead.of(head), targets, token_loss, 1.3, chunk_size)
        got = _grads(loss, inputs)
        _close(loss, want_loss)
        _close(logprobs, plain)
        for a, b in zip(got, want, strict=True):
            assert a.abs().sum() > 0, name
            _close(a, b)
    _close(linear_token_logprobs(hidden, LinearHead.of(head), targets, 1.3, chunk_size), plain)


def test_default_chunk_size_follows_the_vocabulary() -> None:
    assert default_chunk_size(151_936, 1024) < 128 < default_chunk_size(32_000, 512)
    assert default_chunk_size(10**9, 1) == 1
    assert default_chunk_size(151_936, 1024, budget_bytes=2 * default_chunk_size(151_936, 1024) * 4 * (8 * 151_936 + 2048)) >= 2


def test_chunk_size_zero_raises() -> None:
    s_head, t_head = _heads()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_divergence(torch.randn(_N, _H), LinearHead.of(s_head), torch.randn(_N, _H + 2), LinearHead.of(t_head), torch.ones(_N), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(torch.randn(_N, _H), LinearHead.of(s_head), torch.zeros(_N, dtype=torch.long), chunk_size=0)


def test_a_head_that_is_not_linear_is_named() -> None:
    with pytest.raises(TypeError, match="lm_head out of model.lora.target_modules"):
        LinearHead.of(nn.Sequential(nn.Linear(_H, _V)))


@pytest.mark.parametrize("rows", [0, 3])
def test_empty_and_all_masked_inputs_give_zero_loss_and_zero_gradient(rows: int) -> None:
    """N = 0 (no response token in the batch) and N > 0 with every weight 0 (all masked)."""
    s_head, t_head = _heads()
    hidden = torch.randn(rows, _H, requires_grad=True)
    weights = torch.zeros(rows)
    loss, per_token, unclipped = linear_divergence(hidden, LinearHead.of(s_head), torch.randn(rows, _H + 2), LinearHead.of(t_head), weights, 0.5, chunk_size=2)
    nll, logprobs = linear_logprob_loss(hidden, LinearHead.of(s_head), torch.zeros(rows, dtype=torch.long), lambda lp, r: -(weights[r] * lp).sum(), chunk_size=2)
    assert per_token.shape == unclipped.shape == logprobs.shape == (rows,)
    (loss + nll).backward()
    assert torch.equal(loss.detach(), torch.tensor(0.0)) and torch.equal(nll.detach(), torch.tensor(0.0))
    assert hidden.grad is not None and torch.equal(hidden.grad, torch.zeros(rows, _H))
    assert s_head.weight.grad is not None and torch.equal(s_head.weight.grad, torch.zeros(_V, _H))


# ---------------------------------------------------------------------------------- aggregation

_PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
_WEIGHTS = torch.tensor([2.0, 0.5])


def test_aggregate_sample_mode_by_hand() -> None:
    # sample 0: 2 * mean(1, 2) = 3; sample 1: 0.5 * mean(4) = 2; mean over samples = 2.5
    _close(aggregate(_PER_TOKEN, _MASK, _WEIGHTS, "sample"), torch.tensor(2.5))
    # unweighted: (1.5 + 4) / 2
    _close(aggregate(_PER_TOKEN, _MASK, None, "sample"), torch.tensor(2.75))


def test_aggregate_token_mode_by_hand() -> None:
    # (2 * (1 + 2) + 0.5 * 4) / 3 counted tokens = 8 / 3
    _close(aggregate(_PER_TOKEN, _MASK, _WEIGHTS, "token"), torch.tensor(8 / 3))
    # unweighted: (1 + 2 + 4) / 3
    _close(aggregate(_PER_TOKEN, _MASK, None, "token"), torch.tensor(7 / 3))


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_aggregate_all_masked_is_exact_zero_with_zero_grad(mode: str) -> None:
    per_token = torch.tensor([[1.0, -2.0], [3.0, 4.0]], requires_grad=True)
    out = aggregate(per_token, torch.zeros(2, 2), _WEIGHTS, mode)  # type: ignore[arg-type]
    assert torch.equal(out, torch.tensor(0.0))
    out.backward()
    assert per_token.grad is not None
    assert torch.equal(per_token.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_aggregate_ignores_masked_values(mode: str) -> None:
    huge = _PER_TOKEN.clone()
    huge[_MASK == 0] = 1e30
    huge.requires_grad_(True)
    out = aggregate(huge, _MASK, _WEIGHTS, mode)  # type: ignore[arg-type]
    assert torch.equal(out, aggregate(_PER_TOKEN, _MASK, _WEIGHTS, mode))  # type: ignore[arg-type]
    out.backward()
    assert huge.grad is not None
    assert torch.equal(huge.grad[_MASK == 0], torch.zeros(3))
    assert (huge.grad[_MASK == 1] > 0).all()


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_token_weights_are_the_coefficients_of_aggregate(mode: str) -> None:
    coefficients = token_weights(_MASK, _WEIGHTS, mode)  # type: ignore[arg-type]
    _close((coefficients * _PER_TOKEN).sum(), aggregate(_PER_TOKEN, _MASK, _WEIGHTS, mode))  # type: ignore[arg-type]
    assert torch.equal(coefficients[_MASK == 0], torch.zeros(3))


def test_aggregate_bad_mode_raises() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(_PER_TOKEN, _MASK, mode="mean")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: mean 1/2, population std 1/2 -> +-0.5 / 0.5
    # group 1: mean 1/4, centred (3/4, -1/4, -1/4, -1/4), var = (9/16 + 3/16) / 4 = 3/16, std = sqrt(3)/4
    std1 = math.sqrt(3) / 4
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-6)
    want = torch.cat([want, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std1 + 1e-6)])
    _close(group_advantages(rewards, ids), want)
    # sanity of the numbers above: 0.75 / (sqrt(3)/4) = sqrt(3) = 1.7320508
    assert abs(group_advantages(rewards, ids)[4].item() - 1.7320508) < 1e-4


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.3])
@pytest.mark.parametrize("size", [1, 3, 7, 8])
def test_group_advantages_zero_spread_group_is_exact_zero(value: float, size: int) -> None:
    rewards = torch.cat([torch.full((size,), value), torch.tensor([0.0, 1.0])])
    ids = torch.cat([torch.zeros(size, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    for scale in (True, False):
        adv = group_advantages(rewards, ids, scale_by_std=scale)
        assert torch.equal(adv[:size], torch.zeros(size))
        assert (adv[size:].abs() > 0.4).all()


def test_group_advantages_without_std_are_centred() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    # group 0 mean 1/3, group 1 mean 2
    want = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0])
    _close(group_advantages(rewards, ids, scale_by_std=False), want)


def test_group_advantages_non_contiguous_ids() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    perm = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    sparse_ids = torch.where(ids[perm] == 0, 42, 7)
    _close(group_advantages(rewards[perm], sparse_ids), group_advantages(rewards, ids)[perm])


# ------------------------------------------------------------------------------ policy gradient


def _policy(ratios: list[float], advantages: list[float], **kwargs: float | None) -> tuple[Tensor, Tensor]:
    """Per-token loss and its gradient w.r.t. the current log-probabilities (old log-probs are 0)."""
    logprobs = torch.log(torch.tensor([ratios], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros_like(logprobs)
    loss = clipped_policy_loss(logprobs, old, torch.tensor([advantages], dtype=torch.float64), **kwargs)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return loss[0], grad[0]


def test_positive_advantage_clips_above_only() -> None:
    loss, grad = _policy([1.5, 0.5, 1.1], [2.0, 2.0, 2.0])
    # 1.5 -> clipped at 1.2 (no gradient); 0.5 -> unclipped, d(-r A)/dlog r = -r A = -1.0; 1.1 inside
    _close(loss, torch.tensor([-2.4, -1.0, -2.2]))
    _close(grad, torch.tensor([0.0, -1.0, -2.2]))


def test_negative_advantage_clips_below_only() -> None:
    loss, grad = _policy([0.5, 1.5, 0.9], [-2.0, -2.0, -2.0])
    # 0.5 -> clipped at 0.8 (no gradient); 1.5 -> unclipped, -r A = 3.0; 0.9 inside
    _close(loss, torch.tensor([1.6, 3.0, 1.8]))
    _close(grad, torch.tensor([0.0, 3.0, 1.8]))


def test_asymmetric_clip_boundaries() -> None:
    ratios = [1.25, 1.3, 0.79, 0.85]
    adv = [1.0, 1.0, -1.0, -1.0]
    loss, grad = _policy(ratios, adv, clip_low=0.2, clip_high=0.28)
    # 1.25 < 1.28 not clipped; 1.3 clipped to 1.28; 0.79 < 0.8 clipped; 0.85 not clipped
    _close(loss, torch.tensor([-1.25, -1.28, 0.8, 0.85]))
    _close(grad, torch.tensor([-1.25, 0.0, 0.0, 0.85]))
    sym_loss, sym_grad = _policy(ratios, adv, clip_low=0.2, clip_high=0.2)
    _close(sym_loss, torch.tensor([-1.2, -1.2, 0.8, 0.85]))
    _close(sym_grad, torch.tensor([0.0, 0.0, 0.0, 0.85]))


def test_dual_clip_caps_negative_advantage_only() -> None:
    ratios, adv = [20.0, 20.0, 1.0, 5.0], [-2.0, 2.0, -2.0, -2.0]
    loss, grad = _policy(ratios, adv, clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    # A<0, ratio 20: min(40, 10 * 2) = 20, no gradient; A>0 ratio 20: -1.28 * 2; small ratios unchanged
    _close(loss, torch.tensor([20.0, -2.56, 2.0, 10.0]))
    _close(grad, torch.tensor([0.0, 0.0, 2.0, 10.0]))
    plain, _ = _policy(ratios, adv, clip_low=0.2, clip_high=0.28)
    _close(plain, torch.tensor([40.0, -2.56, 2.0, 10.0]))


@pytest.mark.parametrize("dual_clip", [1.0, 0.5])
def test_dual_clip_at_most_one_raises(dual_clip: float) -> None:
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), dual_clip=dual_clip)


def test_policy_loss_treats_advantages_and_old_logprobs_as_constants() -> None:
    logprobs = torch.tensor([[-0.1, -0.5, -0.2]], requires_grad=True)
    old = torch.tensor([[-0.2, -0.4, -0.2]], requires_grad=True)
    adv = torch.tensor([[1.5]], requires_grad=True)  # (B, 1) broadcast over T
    loss = clipped_policy_loss(logprobs, old, adv)
    assert loss.shape == (1, 3)
    loss.sum().backward()
    assert adv.grad is None
    assert old.grad is None
    assert logprobs.grad is not None and logprobs.grad.abs().sum() > 0


def test_sampled_token_kl_advantage_is_detached_log_ratio() -> None:
    s = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    t = torch.tensor([[-1.0, -0.5, -1.0]], requires_grad=True)
    adv = sampled_token_kl_advantage(s, t)
    assert torch.equal(adv, torch.tensor([[-0.5, 1.5, 0.0]]))
    assert not adv.requires_grad


def test_sampled_token_kl_advantage_estimates_minus_reverse_kl() -> None:
    g = torch.Generator().manual_seed(5)
    p_s = torch.tensor([0.6, 0.25, 0.1, 0.05])
    p_t = torch.tensor([0.2, 0.3, 0.3, 0.2])
    y = torch.multinomial(p_s, 20000, replacement=True, generator=g)
    adv = sampled_token_kl_advantage(p_s.log()[y][None], p_t.log()[y][None])
    reverse = _explicit_kl(p_s.double(), p_t.double()).item()
    assert reverse > 0.3
    assert abs(adv.mean().item() + reverse) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_divergence_on_cuda_under_autocast(dtype: torch.dtype) -> None:
    """On a GPU, with bf16-mixed autocast around it (as ``trainer.precision: bf16-mixed`` runs
    it) and a head stored in ``dtype``: the fused loss and gradients agree with the plain path
    computed from the same head in float32."""
    g = torch.Generator().manual_seed(5)
    head = nn.Linear(64, 1000, bias=False).to("cuda", dtype)
    t_head = nn.Linear(64, 1000, bias=False).to("cuda", dtype).requires_grad_(False)
    hidden = torch.randn(300, 64, generator=g).to("cuda").requires_grad_(True)
    t_hidden = torch.randn(300, 64, generator=g).to("cuda")
    weights = torch.rand(300, generator=g).to("cuda")
    plain = generalized_jsd(hidden.to(dtype) @ head.weight.T, t_hidden.to(dtype) @ t_head.weight.T, 1.0)
    want = _grads((weights * plain).sum(), [hidden, head.weight])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = linear_divergence(hidden, LinearHead.of(head), t_hidden, LinearHead.of(t_head), weights, 1.0, chunk_size=128)
    got = _grads(loss, [hidden, head.weight])
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(loss.float(), (weights * plain).sum().float(), **tolerance)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
