"""Which loss terms a step trains with, and their settings (the YAML key ``model.loss``).

Plain data, free of Lightning, so a rollout plan can carry a per-step override (see
:class:`~lit_zpd.callbacks.kl_schedule.KLSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_zpd.losses import Aggregation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_TERMS = (*DIVERGENCES, "on_policy_distill")
ROLLOUT_TERMS = ("policy", "on_policy_distill")


@dataclass
class LossConfig:
    """Coefficients of the loss terms (0 switches a term off) and their settings.

    Args:
        sft: Cross-entropy on the batch's response tokens.
        forward_kl: Token-level KL(p_T || p_S) over the vocabulary.
        reverse_kl: Token-level KL(p_S || p_T) over the vocabulary.
        jsd: Generalized JSD with ``jsd_beta`` (GKD).
        policy: PPO clipped surrogate on the batch's advantages (GRPO); needs student rollouts.
        on_policy_distill: Clipped policy gradient with the per-token advantage
            ``-(log p_S(y_t) - log p_T(y_t))`` on student rollouts (sampled-token reverse KL).
        jsd_beta: Teacher weight in the JSD mixture; 0 is forward KL, 1 reverse KL.
        temperature: Softening of both distributions in the divergences.
        entry_clip: Clip each vocabulary entry's term of every divergence at this value before the
            sum over the vocabulary (``clamp(max=entry_clip)``, negative entries kept), as OPSD's
            current recipe does (0.05); ``None`` leaves them unclipped. With a clip the unclipped
            divergence is logged too (``train/<term>_unclipped``).
        clip_low: PPO lower clip range.
        clip_high: PPO upper clip range.
        dual_clip: Dual-clip constant (> 1) or ``None``.
        aggregation: ``sample``: mean over samples of each sample's token mean; ``token``: mean over
            all response tokens of the batch.
        chunk_size: Tokens per chunk of the fused losses, which build logits from hidden states
            one chunk at a time; ``None`` chooses it from the vocabulary and hidden size so that a
            chunk's working memory stays near 512 MiB (:func:`~lit_zpd.losses.default_chunk_size`:
            520 tokens at a 32k vocabulary, 110 at 151,936).
    """

    sft: float = 0.0
    forward_kl: float = 0.0
    reverse_kl: float = 0.0
    jsd: float = 0.0
    policy: float = 0.0
    on_policy_distill: float = 0.0
    jsd_beta: float = 0.5
    temperature: float = 1.0
    entry_clip: float | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: Aggregation = "sample"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("sft", *DIVERGENCES, *ROLLOUT_TERMS):
            if getattr(self, name) < 0:
                raise ValueError(f"model.loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.active:
            raise ValueError("model.loss: set at least one coefficient (sft, forward_kl, reverse_kl, jsd, policy, ...)")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"model.loss.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"model.loss.temperature must be > 0, got {self.temperature}")
        if self.entry_clip is not None and not self.entry_clip > 0:
            raise ValueError(f"model.loss.entry_clip must be > 0 or null, got {self.entry_clip}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"model.loss.chunk_size must be >= 1 or null, got {self.chunk_size}")
        if self.aggregation not in ("sample", "token"):
            raise ValueError(f"model.loss.aggregation must be 'sample' or 'token', got {self.aggregation!r}")
        for name in ("clip_low", "clip_high"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"model.loss.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"model.loss.dual_clip must be > 1 or null, got {self.dual_clip}")

    @property
    def active(self) -> dict[str, float]:
        """Terms with a non-zero coefficient."""
        return {n: getattr(self, n) for n in ("sft", *DIVERGENCES, *ROLLOUT_TERMS) if getattr(self, n) > 0}
