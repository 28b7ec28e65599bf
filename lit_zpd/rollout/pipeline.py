"""RolloutPipeline: one rollout, from problems to a :class:`~lit_zpd.rollout.batch.RolloutBatch`.

The phases are those of :mod:`lit_zpd.rollout.plan`, in this order: draw, plan, sample, adapt,
augment, measure (off-policy pass rates, when a hook asks), gather and track, observe, weight, build. Every
random choice of rollout ``r`` comes from streams seeded by ``(seed, r)`` (and the rank), so a
resumed run rolls out exactly what an uninterrupted one would.

Across ranks: each rank draws its own problems and samples its own noise; the scored groups'
summaries and the counters are gathered once per rollout, so the tracker, every hook's state,
REINFORCE++'s batch statistics and PACED's normalisation are global and identical on every rank.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal, TypeVar

import torch

from lit_zpd.loss_config import ROLLOUT_TERMS, TEACHER_TERMS, LossConfig
from lit_zpd.losses import group_advantages, reinforce_pp_advantages
from lit_zpd.rollout.batch import RolloutBatch, build_batch
from lit_zpd.rollout.context import RolloutContext, RolloutCounters
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.pass_rates import PassRateSettings
from lit_zpd.rollout.plan import (
    DataSource,
    DrawRequest,
    GroupSummary,
    PromptSpec,
    RolloutGroup,
    RolloutHook,
    RolloutPlan,
    check_controls,
    hook_order,
)
from lit_zpd.rollout.sampler import ProblemSampler

AdvantageEstimator = Literal["grpo", "reinforce_pp"]
T = TypeVar("T")


class RolloutPipeline:
    """Plans, samples, scores and batches rollouts (Lightning-free).

    Args:
        ctx: The context hooks receive.
        sampler: Draws each rollout's new problems.
        hooks: The rollout hooks; they run in a canonical order within each phase.
        samples_per_prompt: ``G``, student completions per prompt.
        data_source: Who writes the responses unless ``lmbda`` mixes or a hook sets it.
        lmbda: GKD mixing: each rollout is on-policy with this probability.
        off_policy_source: The off-policy responses when ``lmbda`` mixes.
        teacher_samples_per_prompt: Teacher completions per prompt.
        teacher_correct_only: Keep only the teacher's correct completions.
        advantage_estimator: ``grpo`` or ``reinforce_pp``.
        advantage_scale_by_std: GRPO's division by the group's std.
        pass_rate: How the student's pass rate is measured on off-policy batches.
    """

    def __init__(
        self,
        ctx: RolloutContext,
        sampler: ProblemSampler,
        hooks: list[RolloutHook],
        *,
        samples_per_prompt: int,
        data_source: DataSource,
        lmbda: float | None,
        off_policy_source: DataSource,
        teacher_samples_per_prompt: int,
        teacher_correct_only: bool,
        advantage_estimator: AdvantageEstimator,
        advantage_scale_by_std: bool,
        pass_rate: PassRateSettings,
    ) -> None:
        check_controls(hooks)
        self.ctx = ctx
        self.sampler = sampler
        self.hooks = hook_order(hooks)
        self.samples_per_prompt = samples_per_prompt
        self.data_source = data_source
        self.lmbda = lmbda
        self.off_policy_source = off_policy_source
        self.teacher_samples_per_prompt = teacher_samples_per_prompt
        self.teacher_correct_only = teacher_correct_only
        self.rows_per_rank: list[int] = []  # rows of the last rollout on every rank
        self.advantage_estimator = advantage_estimator
        self.advantage_scale_by_std = advantage_scale_by_std
        self.pass_rate = pass_rate

    def source_for(self, rollout_index: int) -> DataSource:
        """The data source before hooks: ``data_source``, or GKD's seeded coin with ``lmbda``."""
        if self.lmbda is None:
            return self.data_source
        on_policy = random.Random(f"{self.ctx.seed}:lmbda:{rollout_index}").random() < self.lmbda
        return "student" if on_policy else self.off_policy_source

    def rollout(self, index: int) -> RolloutBatch:
        """Rollout ``index`` on this rank (every rank must call it: it gathers).

        An error on one rank before the gather (a problem without a reference, a rank left without
        responses, an engine failure) is gathered too, so that every rank raises it instead of
        the others waiting forever.
        """
        ctx = self.ctx
        ctx.sync_seconds = 0.0
        try:
            plan = self.plan(index)
            with ctx.seeded("rollout", index):
                groups = self._adapt(plan, self._respond(plan, plan.prompts))
                # Hooks sample inside the seeded block (e.g. a teacher), so their draws repeat on resume.
                extra = [spec for hook in self.hooks for spec in hook.on_augment(ctx, plan, groups)]
                if extra:
                    plan.prompts.extend(extra)
                    groups += self._respond(plan, extra)
            if not groups:
                raise RuntimeError(
                    f"rollout {index} has no responses: data.teacher_correct_only or the TeacherAdapter dropped every "
                    "problem without a correct teacher sample (raise data.teacher_samples_per_prompt), or every prompt "
                    "was over the prompt limit (data.prompt.max_tokens; rollout/prompts_skipped_total counts them), or "
                    "raised when tokenised, sampled or scored (the warnings name them; rollout/problems_failed_total)"
                )
            if plan.on_policy:
                ctx.count_student_tokens(sum(len(ids) for g in groups for ids in g.token_ids))
            measured = self._measure(plan, groups)
        except Exception as error:
            ctx.gather((None, None, ctx.take_pending(), f"rank {ctx.rank}: {error}"))
            raise
        summaries, measurements = self._gather(plan, groups, measured)
        for hook in self.hooks:
            hook.on_observe(ctx, plan, summaries)
        for hook in self.hooks:
            factors = hook.on_weight(ctx, plan, groups, summaries)
            if factors is not None:
                _multiply(groups, factors, type(hook).__name__)
        batch = build_batch(
            groups, ctx.encode_prompt, ctx.tokenizer.pad_token_id, plan.data_source,
            self._advantages(summaries, len(groups)) if plan.on_policy else None,
        )
        batch.sampling_temperature = (ctx.sampling.temperature or 1.0) if plan.on_policy else 1.0
        batch.policy_version = plan.policy_version
        batch.rollout_index = batch.batch_index = index
        batch.loss = plan.loss
        batch.metrics = plan.metrics | {
            **{f"rollout/{name}_total": float(getattr(ctx.counters, name)) for name in RolloutCounters.names()},
            "rollout/weight_sync_seconds": ctx.sync_seconds,
            "rollout/pass_rate_measurements": float(measurements),
        }
        batch.histograms = dict(plan.histograms)
        for hook in self.hooks:
            before = set(batch.extras)
            hook.on_build(ctx, plan, batch)
            _check_declared(hook, {f"extras.{k}" for k in set(batch.extras) - before}, "batch.extras")
        return batch

    def plan(self, index: int) -> RolloutPlan:
        """Draw and plan phases: this rank's new problems and the hooks' additions and settings."""
        ctx = self.ctx
        request = DrawRequest()
        for hook in self.hooks:
            hook.on_draw(ctx, request)
        draws = self.sampler.draw(index, ctx.world_size, request)
        plan = RolloutPlan(
            rollout_index=index, policy_version=ctx.policy_version, data_source=self.source_for(index),
            prompts=[PromptSpec(p) for p in draws[ctx.rank]], drawn=len(draws[ctx.rank]),
            drawn_everywhere=frozenset(p.problem_id for rank in draws for p in rank), draw=request,
        )
        # The owner of the teacher context plans last, so that it sees every planned prompt.
        for hook in sorted(self.hooks, key=lambda h: "teacher_context" in h.rollout_controls()):
            before = (plan.data_source, plan.loss)
            prompts = {id(spec): spec.teacher_prompt for spec in plan.prompts}
            hook.on_plan(ctx, plan)
            changed = {name for name, old in zip(("data_source", "loss"), before) if getattr(plan, name) is not old}
            if any(spec.teacher_prompt != prompts.get(id(spec)) for spec in plan.prompts):
                changed.add("teacher_context")
            _check_declared(hook, changed, "plan")
        self._check_loss(plan)
        return plan

    def _check_loss(self, plan: RolloutPlan) -> None:
        check_loss_and_source(plan.loss or self.ctx.loss, plan.data_source, self.ctx.teacher is not None)

    def check_setup(self) -> None:
        """Check ``model.loss`` against every data source the settings can draw (at setup, when no
        hook sets the loss or the data source)."""
        sources = {self.data_source} if self.lmbda is None else {"student", self.off_policy_source}
        for source in sorted(sources):
            check_loss_and_source(self.ctx.loss, source, self.ctx.teacher is not None)

    def _respond(self, plan: RolloutPlan, specs: list[PromptSpec]) -> list[RolloutGroup]:
        """The sample phase: responses to ``specs`` from ``plan.data_source``, scored. A problem
        whose prompt cannot be tokenised, sampled or scored is skipped (see :meth:`_guarded`)."""
        ctx = self.ctx
        specs = [s for s, kept in self._guarded(plan, "tokenising its prompt", specs, lambda s: ctx.admit([s])) if kept]
        if plan.data_source == "reference":
            missing = [s.problem.problem_id for s in specs if s.problem.reference is None]
            if missing:
                raise ValueError(f"problem {missing[0]!r} has no reference solution")

            def answer(spec: PromptSpec) -> RolloutGroup:
                return ctx.score(spec, [ctx.tokenize(spec.problem.reference) + [ctx.tokenizer.eos_token_id]])  # type: ignore[arg-type]

            return [group for _, group in self._guarded(plan, "scoring its reference", specs, answer)]
        if plan.on_policy:
            model, n, sampling = ctx.student, self.samples_per_prompt, ctx.sampling
        else:
            model, n, sampling = ctx.teacher, self.teacher_samples_per_prompt, ctx.teacher_sampling
        teacher_side = plan.data_source == "teacher"

        def prompt(spec: PromptSpec) -> list[int]:
            return ctx.encode_prompt(spec.teacher_prompt if teacher_side and spec.teacher_prompt else spec.student_prompt)

        encoded = self._guarded(plan, "tokenising its prompt", specs, prompt)
        answered = self._generate(plan, ctx.engine_for(model), encoded, n, sampling)
        sampled = {id(spec): samples for spec, samples in answered}

        def score(spec: PromptSpec) -> RolloutGroup:
            samples = sampled[id(spec)]
            return ctx.score(spec, [c.token_ids for c in samples], [c.logprobs for c in samples] if plan.on_policy else None)

        groups = []
        for _, group in self._guarded(plan, "scoring", [spec for spec, _ in answered], score):
            if teacher_side and self.teacher_correct_only:
                group = _keep_correct(group)
            if group.token_ids:
                groups.append(group)
        return groups

    def _guarded(
        self, plan: RolloutPlan, stage: str, specs: list[PromptSpec], work: Callable[[PromptSpec], T]
    ) -> list[tuple[PromptSpec, T]]:
        """``work(spec)`` for every spec, leaving out each spec whose work raises: its problem is
        skipped for this rollout, counted (``rollout/problems_failed_total``) and named in a
        warning, so that one bad row neither stops the run nor stops every resume of it."""
        done = []
        for spec in specs:
            try:
                done.append((spec, work(spec)))
            except Exception as error:  # noqa: BLE001 - a bad row may make a tokenizer or engine raise anything
                self.ctx.skip_problem(f"rollout {plan.rollout_index}", spec.problem, stage, error)
        return done

    def _generate(
        self, plan: RolloutPlan, engine: RolloutEngine, encoded: list[tuple[PromptSpec, list[int]]], n: int, sampling: SamplingConfig
    ) -> list[tuple[PromptSpec, list[Completion]]]:
        """``n`` completions of every encoded prompt (:meth:`RolloutContext.generate`: a prompt
        that makes the engine raise is skipped, an engine failing on all is a fault)."""
        specs = [spec for spec, _ in encoded]
        with self.ctx.profile("rollout.sampling"):
            answered = self.ctx.generate(
                engine, f"rollout {plan.rollout_index}", [s.problem for s in specs], [ids for _, ids in encoded], n, sampling
            )
        return [(specs[index], completions) for index, completions in answered]

    def _adapt(self, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[RolloutGroup]:
        """The adapt phase: on teacher or reference batches, the owner of ``responses`` may
        replace the groups (at most one hook declares it)."""
        if plan.on_policy:
            return groups
        for hook in self.hooks:
            adapted = hook.on_adapt(self.ctx, plan, groups)
            if adapted is not None:
                _check_declared(hook, {"responses"}, "the batch's")
                groups = adapted
        return groups

    def _measure(self, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[GroupSummary]:
        """K student samples of each problem of an off-policy batch whose pass rate is stale,
        when a hook reads pass rates there. They count toward the student rollout tokens."""
        ctx = self.ctx
        if plan.on_policy or not any(hook.needs_pass_rates() for hook in self.hooks):
            return []
        stale = {}
        for group in groups:
            pid = group.spec.problem.problem_id
            if ctx.pass_rates.is_stale(pid, plan.policy_version, self.pass_rate.refresh_every_n_steps):
                stale.setdefault(pid, group.spec.problem)
        if not stale:
            return []
        sampling = self.pass_rate.sampling(ctx.sampling.max_new_tokens)
        specs = [PromptSpec(p) for p in stale.values()]
        encoded = self._guarded(plan, "tokenising its prompt", specs, lambda s: ctx.encode_prompt(s.problem.prompt))
        engine = ctx.engine_for(ctx.student)
        with ctx.seeded("paced", plan.rollout_index):
            answered = self._generate(plan, engine, encoded, self.pass_rate.rollouts, sampling)
        ctx.count_student_tokens(sum(len(c.token_ids) for _, samples in answered for c in samples))
        sampled = {id(spec): samples for spec, samples in answered}

        def summary(spec: PromptSpec) -> GroupSummary:
            return ctx.score(spec, [c.token_ids for c in sampled[id(spec)]]).summary(ctx.rank, on_policy=True)

        return [summary for _, summary in self._guarded(plan, "scoring", [spec for spec, _ in answered], summary)]

    def _gather(
        self, plan: RolloutPlan, groups: list[RolloutGroup], measured: list[GroupSummary]
    ) -> tuple[list[GroupSummary], int]:
        """Every rank's group summaries and counts; updates the run totals and the pass-rate
        tracker. Returns the summaries and the number of pass-rate measurements of every rank."""
        ctx = self.ctx
        local = [g.summary(ctx.rank, plan.on_policy) for g in groups]
        parts = ctx.gather((local, measured, ctx.take_pending(), None))
        failed = [error for *_, error in parts if error is not None]
        if failed:
            raise RuntimeError(f"rollout {plan.rollout_index} failed on another rank: {failed[0]}")
        ctx.reduce_counters([counts for _, _, counts, _ in parts])
        summaries = [s for rows, _, _, _ in parts for s in rows]
        self.rows_per_rank = [sum(len(s.rewards) for s in rows) for rows, _, _, _ in parts]
        for s in summaries:
            if s.on_policy and s.kind == "plain":
                ctx.pass_rates.update(s.problem_id, s.rewards, plan.policy_version)
        measurements = [s for _, rows, _, _ in parts for s in rows]
        for s in measurements:
            ctx.pass_rates.update(s.problem_id, s.rewards, plan.policy_version)
        return summaries, len(measurements)

    def _advantages(self, summaries: list[GroupSummary], local_groups: int) -> list[float]:
        """Advantages of this rank's rows, computed over the groups of every rank."""
        rewards = torch.tensor([r for s in summaries for r in s.rewards])
        ids = torch.tensor([k for k, s in enumerate(summaries) for _ in s.rewards])
        if self.advantage_estimator == "reinforce_pp":
            advantages = reinforce_pp_advantages(rewards, ids)
        else:
            advantages = group_advantages(rewards, ids, scale_by_std=self.advantage_scale_by_std)
        start = sum(len(s.rewards) for s in summaries if s.rank < self.ctx.rank)
        rows = sum(len(s.rewards) for s in summaries if s.rank == self.ctx.rank)
        assert sum(s.rank == self.ctx.rank for s in summaries) == local_groups
        return advantages[start : start + rows].tolist()


def check_loss_and_source(loss: LossConfig, data_source: DataSource, has_teacher: bool) -> None:
    """A loss that needs student rollouts gets them; a loss or data source that needs a teacher has one."""
    rollout_terms = sorted(loss.active.keys() & set(ROLLOUT_TERMS))
    if rollout_terms and data_source != "student":
        raise ValueError(
            f"model.loss uses {rollout_terms}, which need student rollouts, but the data source is {data_source!r}: "
            "set data.data_source: student and data.lmbda: null"
        )
    teacher_terms = sorted(loss.active.keys() & set(TEACHER_TERMS))
    if not has_teacher and (teacher_terms or data_source == "teacher"):
        raise ValueError(f"{teacher_terms or 'data_source: teacher'} needs a teacher: set model.teacher")


def _multiply(groups: list[RolloutGroup], factors: list[list[float]], name: str) -> None:
    if len(factors) != len(groups) or any(len(f) != len(g.weights) for f, g in zip(factors, groups)):
        raise RuntimeError(f"{name}.on_weight must return one factor per sample of every group")
    for group, row in zip(groups, factors):
        group.weights = [w * f for w, f in zip(group.weights, row)]


def _check_declared(hook: RolloutHook, changed: set[str], where: str) -> None:
    undeclared = sorted(changed - hook.rollout_controls())
    if undeclared:
        raise RuntimeError(
            f"{type(hook).__name__} changed {where} {', '.join(undeclared)} without declaring it in rollout_controls()"
        )


def _keep_correct(group: RolloutGroup) -> RolloutGroup:
    keep = [i for i, r in enumerate(group.rewards) if r > 0]
    return RolloutGroup(
        spec=group.spec,
        token_ids=[group.token_ids[i] for i in keep],
        texts=[group.texts[i] for i in keep],
        rewards=[group.rewards[i] for i in keep],
    )
