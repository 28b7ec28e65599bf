"""What one step rolls out, what came back, and the hooks through which callbacks take part.

A training step, as the :class:`~lit_zpd.rollout.datamodule.RolloutDataModule` runs it:

1. the step's problems become a :class:`RolloutPlan`; every :class:`RolloutHook` may edit it
   (``on_rollout_plan``: add replayed problems, BCQ/NCQ prompts, restrict skills, attach a
   privileged teacher context);
2. the engine samples ``G`` completions per prompt; 3. the verifier scores them into
   :class:`RolloutGroup` objects with their pass rate;
3b. hooks may return extra prompts built from those groups (``on_rollout_augment``: BCQ/NCQ
   reformulations of the hard problems); they are sampled and scored as more groups of the same
   batch, by the same weights;
4. hooks observe all scored groups (``on_rollout_scored``) and may set per-sample ``weights``;
5. the batch is built; hooks may add fields (``on_batch_built``); 6. the module trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lit_zpd.tasks.problem import Problem

DataSource = Literal["student", "teacher", "reference"]
PromptKind = Literal["plain", "bcq", "ncq"]


@dataclass
class PromptSpec:
    """One prompt to roll out.

    Args:
        problem: The problem it is about; its answer scores the completions.
        kind: ``plain`` for the original problem; reformulations (``bcq``, ``ncq``) form their
            own groups.
        student_prompt: Text the student sees; defaults to ``problem.prompt``.
        teacher_prompt: Text the teacher is conditioned on instead (a privileged context);
            defaults to the student's prompt.
    """

    problem: Problem
    kind: PromptKind = "plain"
    student_prompt: str | None = None
    teacher_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.student_prompt is None:
            self.student_prompt = self.problem.prompt


@dataclass
class RolloutPlan:
    """The prompts of one training batch.

    Args:
        index: Position of the batch in the training stream (0, 1, ...), the seed of its
            randomness.
        policy_version: Optimizer steps taken by the weights that will sample it.
        source: Who writes the responses: the student (on-policy), the teacher or the reference
            solutions (off-policy).
        prompts: The prompts; hooks append and remove.
    """

    index: int
    policy_version: int
    source: DataSource
    prompts: list[PromptSpec]


@dataclass
class RolloutGroup:
    """The completions of one prompt, scored.

    Args:
        spec: The prompt.
        token_ids: Completion tokens per sample.
        texts: Decoded completions.
        rewards: Verifier score per sample, 0 or 1.
        sampling_logprobs: Per-token log-probabilities under the sampling weights (student
            rollouts only).
        weights: Per-sample loss weights; hooks may change them (default 1).
    """

    spec: PromptSpec
    token_ids: list[list[int]]
    texts: list[str]
    rewards: list[float]
    sampling_logprobs: list[list[float]] | None = None
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = [1.0] * len(self.token_ids)

    @property
    def pass_rate(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0


class RolloutHook:
    """Mix into a Lightning callback to take part in rollouts. Every method is optional.

    The data module calls the hooks of every callback on the trainer that derives from this class,
    in the trainer's callback order. A hook must not rely on another hook's presence.
    """

    def on_rollout_plan(self, trainer: Any, plan: RolloutPlan) -> None:
        """Edit ``plan.prompts`` before sampling."""

    def on_rollout_augment(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[PromptSpec]:
        """Extra prompts for this batch, given the scored groups of ``plan.prompts``.

        Called once per batch after the first sampling pass; the returned prompts of all hooks are
        appended to ``plan.prompts``, sampled and scored in a second pass (never augmented again).
        """
        return []

    def on_rollout_scored(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> None:
        """Observe scored groups (augmented ones included); may set ``group.weights``."""

    def on_batch_built(self, trainer: Any, plan: RolloutPlan, batch: dict[str, Any]) -> None:
        """Add or change batch fields before the training step."""
