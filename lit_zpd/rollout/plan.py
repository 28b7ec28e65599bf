"""What one step rolls out, what came back, and the phases through which callbacks take part.

A training rollout, as :class:`~lit_zpd.rollout.pipeline.RolloutPipeline` runs it (each phase
calls every :class:`RolloutHook` before the next phase starts):

1. **draw**: hooks restrict or weight which problems the
   :class:`~lit_zpd.rollout.sampler.ProblemSampler` may draw (:class:`DrawRequest`); it then
   draws this rank's new problems.
2. **plan**: hooks add prompts (replayed problems, ...) and may set the step's data source and
   loss (:class:`RolloutPlan`). The plan carries the draw phase's request, so a hook that adds
   problems of its own (a replay buffer) keeps to the same restrictions (:meth:`DrawRequest.allows`).
3. The engine samples ``G`` completions per prompt; the problem source's verifier scores them
   into :class:`RolloutGroup` objects.
4. **adapt** (teacher or reference batches): a hook may replace those groups with material fitted
   to the student (IOA's Adapter: choose among the teacher's samples, rewrite them).
5. **augment**: hooks return extra prompts built from those groups (BCQ/NCQ), sampled and
   scored in the same batch.
6. Group statistics are computed once: every rank's groups are summarised
   (:class:`GroupSummary`), gathered across ranks, and the shared pass-rate tracker is updated.
7. **observe**: hooks read the summaries of every rank (replay admission and graduation,
   mastery); their state stays identical across ranks.
8. **weight**: hooks return per-sample weight factors for this rank's groups; factors multiply.
9. **build**: the :class:`~lit_zpd.rollout.batch.RolloutBatch` is built; hooks may add
   ``extras``.

What a hook may change is explicit. Additive effects (prompts added, weight factors, metrics
logged) commute. The exclusive ones, ``data_source``, ``loss``, ``teacher_context`` (the
``teacher_prompt`` of the planned prompts: a privileged context), ``responses`` (the adapt phase)
and each ``extras.<key>``, must be
declared in :meth:`RolloutHook.rollout_controls`: two hooks declaring the same control is an error
at setup, and a hook that changes one it did not declare is an error when it does. Hooks of one
phase run in a canonical order (by class name, then ``state_key``), so the order of
``trainer.callbacks`` in a YAML file does not change a run; in the plan phase the owner of
``teacher_context`` runs last, so the context reaches every planned prompt (replayed ones too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lit_zpd.loss_config import LossConfig
from lit_zpd.tasks.problem import Problem

if TYPE_CHECKING:
    from torch import Tensor

    from lit_zpd.rollout.batch import RolloutBatch
    from lit_zpd.rollout.context import RolloutContext

DataSource = Literal["student", "teacher", "reference"]
PromptKind = Literal["plain", "bcq", "ncq"]
CONTROLS = ("data_source", "loss", "teacher_context", "responses")


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
        replayed: Added by a replay buffer rather than drawn new this step.
    """

    problem: Problem
    kind: PromptKind = "plain"
    student_prompt: str = ""
    teacher_prompt: str | None = None
    replayed: bool = False

    def __post_init__(self) -> None:
        if not self.student_prompt:
            self.student_prompt = self.problem.prompt


@dataclass
class DrawRequest:
    """How the step's new problems may be drawn; hooks edit it in the draw phase.

    Restrictions intersect and weights multiply, so hooks commute. With neither, the sampler walks
    seeded epochs of the train split; with either, it draws without replacement from the allowed
    problems in proportion to their weight.
    """

    restrictions: dict[str, Callable[[Problem], bool]] = field(default_factory=dict)
    weightings: dict[str, Callable[[Problem], float]] = field(default_factory=dict)

    def restrict(self, name: str, allowed: Callable[[Problem], bool]) -> None:
        """Only problems for which ``allowed`` is true may be drawn; ``name`` says who asked."""
        self.restrictions[name] = allowed

    def weight(self, name: str, weight: Callable[[Problem], float]) -> None:
        """Draw problems in proportion to ``weight`` (>= 0)."""
        self.weightings[name] = weight

    def allows(self, problem: Problem) -> bool:
        """Whether every restriction admits ``problem`` (weights do not exclude)."""
        return all(allowed(problem) for allowed in self.restrictions.values())


@dataclass
class RolloutPlan:
    """The prompts of one rollout and the settings it trains with.

    Args:
        rollout_index: Which rollout of the run this is (0, 1, ...); with ``data.ppo_minibatches``
            one rollout serves several optimizer steps.
        policy_version: Optimizer steps taken by the weights that sample it.
        data_source: Who writes the responses: the student (on-policy), the teacher or the
            reference solutions (off-policy). A control (see the module doc).
        prompts: The drawn problems first (``drawn`` of them), then the prompts hooks added.
        drawn: How many of ``prompts`` the sampler drew on this rank (``|new|`` in ZPPO's ratios).
        drawn_everywhere: Ids of the problems every rank drew new this rollout.
        draw: The draw phase's restrictions and weights; problems a hook adds in the plan phase
            should be ones it :meth:`~DrawRequest.allows`.
        loss: The loss of this rollout's optimizer steps; ``None`` keeps the module's
            ``model.loss``. A control.
        metrics: Per-rollout scalars logged once per rollout (``replay/admitted``, ...).
        histograms: Per-rollout tensors for TensorBoard histograms.
    """

    rollout_index: int
    policy_version: int
    data_source: DataSource
    prompts: list[PromptSpec]
    drawn: int = 0
    drawn_everywhere: frozenset[str] = frozenset()
    draw: DrawRequest = field(default_factory=DrawRequest)
    loss: LossConfig | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def on_policy(self) -> bool:
        return self.data_source == "student"


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
        weights: Per-sample loss weights: the product of the weight phase's factors (default 1).
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

    def summary(self, rank: int, on_policy: bool) -> GroupSummary:
        return GroupSummary(
            problem_id=self.spec.problem.problem_id,
            skill=self.spec.problem.skill,
            difficulty=self.spec.problem.difficulty,
            kind=self.spec.kind,
            replayed=self.spec.replayed,
            rewards=list(self.rewards),
            completion_tokens=sum(len(ids) for ids in self.token_ids),
            on_policy=on_policy,
            rank=rank,
        )


@dataclass(frozen=True)
class GroupSummary:
    """What every rank learns about one scored group: plain data, gathered across ranks.

    Args:
        problem_id: The problem.
        skill: Its skill.
        difficulty: Its difficulty level.
        kind: ``plain``, ``bcq`` or ``ncq``.
        replayed: Whether a replay buffer added the prompt.
        rewards: Verifier score per sample.
        completion_tokens: Tokens of all its completions.
        on_policy: The student wrote the completions (a rollout or a pass-rate measurement);
            otherwise the teacher or the reference did.
        rank: The rank that rolled it out.
    """

    problem_id: str
    skill: str
    difficulty: int
    kind: str
    replayed: bool
    rewards: list[float]
    completion_tokens: int
    on_policy: bool
    rank: int

    @property
    def pass_rate(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0


class RolloutHook:
    """Mix into a Lightning callback to take part in rollouts; every method is optional.

    Hooks receive the :class:`~lit_zpd.rollout.context.RolloutContext` (models, engines,
    scoring, seeded streams, ranks, the pass-rate tracker), never the trainer, and change only
    what the phase hands them. See the module doc for the phases and the rules.
    """

    def rollout_controls(self) -> set[str]:
        """Exclusive settings this hook sets: ``data_source``, ``loss``, ``teacher_context``,
        ``responses``, ``extras.<key>``."""
        return set()

    def needs_pass_rates(self) -> bool:
        """True when the hook reads the student's pass rate of the problems of off-policy
        (teacher or reference) batches; the pipeline then measures the stale ones first."""
        return False

    def on_draw(self, ctx: RolloutContext, draw: DrawRequest) -> None:
        """Restrict or weight the problems the sampler may draw."""

    def on_plan(self, ctx: RolloutContext, plan: RolloutPlan) -> None:
        """Add prompts; set ``plan.data_source``, ``plan.loss`` or the prompts' ``teacher_prompt``
        when declared."""

    def on_adapt(self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[RolloutGroup] | None:
        """Off-policy batches: this rank's scored teacher or reference groups replaced by the
        hook's choice of them (declared as ``responses``), or ``None`` to leave them."""
        return None

    def on_augment(self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[PromptSpec]:
        """Extra prompts of this batch, given this rank's scored groups; sampled and scored in a
        second pass (never augmented again)."""
        return []

    def on_observe(self, ctx: RolloutContext, plan: RolloutPlan, summaries: list[GroupSummary]) -> None:
        """Read the scored groups of every rank (and the pass-rate measurements)."""

    def on_weight(
        self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup], summaries: list[GroupSummary]
    ) -> list[list[float]] | None:
        """Per-sample weight factors for this rank's ``groups`` (one list per group), or ``None``.
        ``summaries`` are every rank's, for statistics that must be global."""
        return None

    def on_build(self, ctx: RolloutContext, plan: RolloutPlan, batch: RolloutBatch) -> None:
        """Add declared ``batch.extras`` before the training step."""


def hook_order(hooks: list[Any]) -> list[Any]:
    """The canonical order of hooks within a phase: by class name, then ``state_key``."""
    return sorted(hooks, key=lambda h: (type(h).__qualname__, str(getattr(h, "state_key", ""))))


def check_controls(hooks: list[RolloutHook]) -> None:
    """Raise if two hooks declare the same control, or a hook declares an unknown one."""
    owners: dict[str, str] = {}
    for hook in hooks:
        for control in sorted(hook.rollout_controls()):
            if control not in CONTROLS and not control.startswith("extras."):
                raise ValueError(
                    f"{type(hook).__name__}: unknown rollout control {control!r}; "
                    f"known: {', '.join(CONTROLS)}, extras.<key>"
                )
            if control in owners:
                raise ValueError(
                    f"{owners[control]} and {type(hook).__name__} both set the rollout's {control}; "
                    "keep one of them in trainer.callbacks"
                )
            owners[control] = type(hook).__name__
