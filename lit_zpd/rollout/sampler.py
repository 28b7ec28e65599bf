"""ProblemSampler: which new problems a rollout draws, on which rank.

Every draw is a function of ``(seed, rollout index, rank, world size)`` and of the hooks'
:class:`~lit_zpd.rollout.plan.DrawRequest`, never of a cursor, so a resumed run draws exactly what
an uninterrupted one would, and the ranks of a multi-process run draw disjoint problems.

- Default (no restriction, no weighting): seeded epochs of the train split. Rollout ``r`` takes
  positions ``[(r * W + k) * P, (r * W + k + 1) * P)`` of the endless stream of shuffled epochs on
  rank ``k`` of ``W`` (``P`` = ``prompts_per_step``), so over an epoch every problem is drawn
  once, whatever the number of ranks (the ranks of one rollout draw disjoint problems when
  ``W * P`` does not exceed the split), and one process draws what it drew before ranks existed.
- With restrictions or weightings: ``W * P`` problems drawn without replacement from the allowed
  ones in proportion to their weight (Efraimidis-Spirakis keys), from a stream seeded by the
  rollout index; rank ``k`` takes every ``W``-th from ``k``. When fewer problems are allowed than
  that, they are drawn again (with replacement), so no rank is left without problems.
"""

from __future__ import annotations

import math
import random

from lit_zpd.rollout.plan import DrawRequest
from lit_zpd.tasks.problem import Problem


class ProblemSampler:
    """Draws each rollout's new problems from the train split.

    Args:
        problems: The train split, in the source's order.
        prompts_per_step: New problems per rollout per rank.
        seed: Seed of the epoch order and the weighted draws.

    Example::

        sampler = ProblemSampler(source.problems("train"), prompts_per_step=16, seed=0)
        rank0, rank1 = sampler.draw(rollout_index=3, world_size=2)
    """

    def __init__(self, problems: list[Problem], prompts_per_step: int, seed: int) -> None:
        if not problems:
            raise ValueError("data.source has no training problems")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        self.problems = problems
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def draw(self, rollout_index: int, world_size: int = 1, request: DrawRequest | None = None) -> list[list[Problem]]:
        """The new problems of rollout ``rollout_index`` of every rank, in rank order (each rank
        keeps its own; the others tell it what not to replay)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if request is None or not (request.restrictions or request.weightings):
            return [self._epoch_walk(rollout_index, rank, world_size) for rank in range(world_size)]
        chosen = self._weighted(rollout_index, world_size, request)
        return [chosen[rank::world_size] for rank in range(world_size)]

    def _epoch_walk(self, rollout_index: int, rank: int, world_size: int) -> list[Problem]:
        n, size = len(self.problems), self.prompts_per_step
        start = (rollout_index * world_size + rank) * size
        out = []
        for position in range(start, start + size):
            epoch, offset = divmod(position, n)
            out.append(self.problems[self._epoch_order(epoch)[offset]])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.problems)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # rollouts walk forward: one epoch's order at a time
        return self._orders[epoch]

    def _weighted(self, rollout_index: int, world_size: int, request: DrawRequest) -> list[Problem]:
        allowed: list[tuple[Problem, float]] = []
        for problem in self.problems:
            if not request.allows(problem):
                continue
            weight = math.prod(w(problem) for w in request.weightings.values())
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"draw weight of {problem.problem_id!r} is {weight}; weights must be finite and >= 0")
            if weight > 0:
                allowed.append((problem, weight))
        if not allowed:
            names = sorted([*request.restrictions, *request.weightings])
            raise RuntimeError(f"rollout {rollout_index}: no training problem is allowed by {', '.join(names)}")
        rng = random.Random(f"{self.seed}:draw:{rollout_index}")
        wanted = self.prompts_per_step * world_size
        chosen: list[Problem] = []
        while len(chosen) < wanted:
            # Efraimidis-Spirakis: the largest u^(1/w) keys are a weighted sample without replacement.
            keyed = sorted(allowed, key=lambda pw: rng.random() ** (1.0 / pw[1]), reverse=True)
            chosen.extend(problem for problem, _ in keyed[: wanted - len(chosen)])
        return chosen
