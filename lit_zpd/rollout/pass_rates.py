"""One per-problem estimate of the student's pass rate, shared by every callback.

Design step 3, "group statistics computed once": every scored group of the student's own
rollouts of a plain problem (on any rank) replaces that problem's estimate, and so does every
pass-rate measurement (K student samples of a problem of an off-policy batch, taken when a hook
asks for pass rates there). PACED's weighting, the replay buffer and a curriculum read it instead
of keeping their own. It is part of the data module's checkpoint state and identical on every rank.

A new measurement replaces the old one rather than pooling with it: the student has moved since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lit_zpd.rollout.engine import SamplingConfig


@dataclass(frozen=True)
class PassRateSettings:
    """How the student's pass rate is measured on problems it did not roll out itself
    (YAML key ``data.pass_rate``).

    Args:
        rollouts: K, student samples per measured problem (PACED: 8).
        temperature: Their sampling temperature; > 0.
        max_new_tokens: Their length cap; ``None`` takes ``data.sampling.max_new_tokens``.
        refresh_every_n_steps: An estimate younger than this many optimizer steps is reused; 1
            measures again at every visit (PACED's "p refreshed whenever a problem is rolled out").
    """

    rollouts: int = 8
    temperature: float = 1.0
    max_new_tokens: int | None = None
    refresh_every_n_steps: int = 1

    def __post_init__(self) -> None:
        if self.rollouts < 1:
            raise ValueError(f"data.pass_rate.rollouts must be >= 1, got {self.rollouts}")
        if not self.temperature > 0:
            raise ValueError(f"data.pass_rate.temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"data.pass_rate.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.refresh_every_n_steps < 1:
            raise ValueError(f"data.pass_rate.refresh_every_n_steps must be >= 1, got {self.refresh_every_n_steps}")

    def sampling(self, default_max_new_tokens: int) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens or default_max_new_tokens)


@dataclass(frozen=True)
class PassRate:
    """One estimate: the pass rate, from how many samples, measured at which optimizer step."""

    pass_rate: float
    samples: int
    step: int


class PassRateTracker:
    """The student's latest pass rate per problem id."""

    def __init__(self) -> None:
        self.estimates: dict[str, PassRate] = {}

    def __len__(self) -> int:
        return len(self.estimates)

    def update(self, problem_id: str, rewards: list[float], step: int) -> None:
        """Replace the estimate of ``problem_id`` by the mean of ``rewards``."""
        if rewards:
            self.estimates[problem_id] = PassRate(sum(rewards) / len(rewards), len(rewards), step)

    def get(self, problem_id: str) -> float | None:
        estimate = self.estimates.get(problem_id)
        return estimate.pass_rate if estimate is not None else None

    def is_stale(self, problem_id: str, step: int, max_age: int) -> bool:
        """No estimate, or one at least ``max_age`` optimizer steps old."""
        estimate = self.estimates.get(problem_id)
        return estimate is None or step - estimate.step >= max_age

    def state_dict(self) -> dict[str, Any]:
        return {pid: [e.pass_rate, e.samples, e.step] for pid, e in self.estimates.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimates = {str(pid): PassRate(float(v[0]), int(v[1]), int(v[2])) for pid, v in state.items()}
