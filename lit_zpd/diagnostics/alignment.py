"""Gradient alignment (seed 002): does a distillation signal point where the student should go?

At a node ``u`` (a prefix of one of the student's own rollouts) the ideal objective is the
student's chance of finishing correctly, ``V(u) = sum_k p_S(k|u) P_succ(k)``, where ``P_succ(k)``
is the probability that the student's continuation after token ``k`` reaches a correct answer.
Its gradient with respect to the student's logits ``z`` at ``u`` is the ideal direction

    ``g*_k = p_S(k) (P_succ(k) - V(u))``.

A distillation signal moves the same logits along its own descent direction ``d``:

- reverse KL(p_S || p_T): ``d_k = -p_S(k) (log p_S(k) - log p_T(k) - KL)``;
- forward KL(p_T || p_S): ``d_k = p_T(k) - p_S(k)``.

The **gradient alignment score** of the node is ``cosine(g*, d)``; averaged per question (over
its nodes and rollouts), per configuration, and split by whether the rollout was correct (the
source's verifier). The **teacher advantage** ``A_T(u) = sum_k (p_T(k) - p_S(k)) P_succ(k)`` is
how much more often the teacher's next-token choice would lead the student to success; over the
candidates it is taken as ``sum_k (p_T(k) - p_S(k)) (P_succ(k) - V(u))``, which equals the sum over
the whole vocabulary when the tokens outside the candidates succeed at ``V(u)`` (the assumption
``V``'s renormalisation makes).

The estimator (:func:`measure_alignment`), and where it is cheaper and noisier than the paper's,
which spends 45k-200k rollouts per question:

- nodes at exponentially spaced depths ``0, 1, 2, 4, 8, ...`` response tokens (every depth of the
  first ``token_view_rollouts`` rollouts, for the per-token picture);
- ``P_succ`` is estimated for the student's top-``top_k`` tokens at the node plus the token it
  sampled, each from ``continuations`` (M) student continuations, batched through the engine; an
  end-of-sequence candidate is scored exactly (the prefix is the whole response);
- ``g*`` is only known on those candidates, so ``V(u)`` is renormalised over them and every cosine
  is taken over the candidate coordinates (``space: logit``). ``space: parameter`` is the exact
  cosine in parameter space for small models: the gradients of ``g* . z`` (candidates) and of the
  divergence (whole vocabulary) with respect to every student weight;
- every student sample counts in ``budget`` (rollouts and continuations); nodes are taken shallow
  depths first, over every rollout, and those that no longer fit are skipped and counted, never
  half-measured. The continuations that estimate ``P_succ`` depend
  on the student only, so every configuration is scored on the same nodes;
- intervals are percentile bootstraps over questions.
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.tasks.problem import Problem

Divergence = Literal["reverse_kl", "forward_kl"]
Space = Literal["logit", "parameter"]


@dataclass
class SignalConfig:
    """One distillation signal to score (a "configuration").

    Args:
        name: Its label in the report and the plots.
        teacher: What ``model.teacher`` takes: a model directory or GGUF file,
            ``embedded:teacher``, or ``self_live`` (the student itself: a privileged self-teacher
            when ``reveal_ratio`` is set).
        reveal_ratio: ``None``: the teacher reads the student's prompt; otherwise the source's
            privileged context with this share of the reference revealed.
        divergence: ``reverse_kl`` or ``forward_kl``.
    """

    name: str
    teacher: str = "embedded:teacher"
    reveal_ratio: float | None = None
    divergence: Divergence = "reverse_kl"

    def __post_init__(self) -> None:
        if self.reveal_ratio is not None and not 0.0 <= self.reveal_ratio <= 1.0:
            raise ValueError(f"signal {self.name!r}: reveal_ratio must be in [0, 1], got {self.reveal_ratio}")
        if self.divergence not in ("reverse_kl", "forward_kl"):
            raise ValueError(f"signal {self.name!r}: divergence must be reverse_kl or forward_kl, got {self.divergence!r}")


@dataclass
class AlignmentSettings:
    """How the diagnostic samples and scores.

    Args:
        rollouts_per_problem: Student rollouts per problem (their nodes are scored).
        top_k: ``K``, the student's most likely tokens whose ``P_succ`` is estimated at a node
            (the sampled token is added).
        continuations: ``M``, student continuations per candidate token.
        budget: Most student samples in all (rollouts and continuations).
        token_view_rollouts: Rollouts (the first ones) scored at every depth, not only at
            ``0, 1, 2, 4, ...``: the per-token picture.
        space: ``logit`` (cosine over the candidate tokens' logits) or ``parameter`` (exact, over
            every student weight; small models).
        bootstrap: Resamples of the questions for the 95% intervals.
        sampling: Sampling of rollouts and continuations (temperature 1 is the student's policy).
    """

    rollouts_per_problem: int = 2
    top_k: int = 8
    continuations: int = 8
    budget: int = 50_000
    token_view_rollouts: int = 1
    space: Space = "logit"
    bootstrap: int = 1000
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=48))

    def __post_init__(self) -> None:
        for key in ("rollouts_per_problem", "top_k", "continuations", "budget", "bootstrap"):
            if getattr(self, key) < 1:
                raise ValueError(f"settings.{key} must be >= 1, got {getattr(self, key)}")
        if self.token_view_rollouts < 0:
            raise ValueError(f"settings.token_view_rollouts must be >= 0, got {self.token_view_rollouts}")
        if self.space not in ("logit", "parameter"):
            raise ValueError(f"settings.space must be logit or parameter, got {self.space!r}")


# --------------------------------------------------------------------------------- the math


def ideal_gradient(p: Tensor, success: Tensor) -> tuple[Tensor, float]:
    """``(g*, V)`` over candidate tokens: ``g*_k = p_k (P_succ(k) - V)`` with ``V`` the
    ``p``-weighted mean of ``P_succ`` over the candidates. ``p``, ``success``: ``(C,)``."""
    value = float((p * success).sum() / p.sum().clamp_min(1e-12))
    return p * (success - value), value


def distillation_direction(log_p_student: Tensor, log_p_teacher: Tensor, divergence: Divergence) -> Tensor:
    """The descent direction of the divergence in the student's logits, ``(V,)`` from ``(V,)``
    log-probabilities (see the module doc)."""
    p_s = log_p_student.exp()
    if divergence == "forward_kl":
        return log_p_teacher.exp() - p_s
    diff = log_p_student - log_p_teacher
    return -p_s * (diff - (p_s * diff).sum())


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two vectors; NaN when either is 0 (no direction to compare)."""
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else math.nan


def teacher_advantage(p_teacher: Tensor, p_student: Tensor, success: Tensor, value: float) -> float:
    """``A_T = sum_k (p_T(k) - p_S(k)) (P_succ(k) - V)`` over the candidate tokens (see the module
    doc: the tokens outside them count as succeeding at ``V``)."""
    return float(((p_teacher - p_student) * (success - value)).sum())


def node_depths(length: int, every: bool) -> list[int]:
    """Response tokens before each node of a response of ``length`` tokens: ``0, 1, 2, 4, ...``
    (or every depth), below ``length``."""
    if every:
        return list(range(length))
    return [d for d in [0, *(2**j for j in range(32))] if d < length]


def depth_bucket(depth: int) -> int:
    """``0`` for the root, else the largest power of two not above ``depth``."""
    return 0 if depth == 0 else 2 ** (depth.bit_length() - 1)


# --------------------------------------------------------------------------------- records


@dataclass
class NodeRecord:
    """One scored node."""

    problem_id: str
    rollout: int
    depth: int
    token: str  # the token the rollout sampled here
    correct: bool  # the whole rollout, by the verifier
    value: float  # V(u)
    cos: dict[str, float]  # per signal
    advantage: dict[str, float]  # per signal


@dataclass
class AlignmentReport:
    """The scored nodes and what they cost."""

    nodes: list[NodeRecord]
    signals: list[str]
    samples: int
    budget: int
    nodes_skipped: int
    space: Space
    bootstrap: int = 1000
    seed: int = 0

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per signal, per split (``correct``, ``incorrect``, ``all``): mean alignment over
        questions (each question the mean of its nodes), its 95% bootstrap interval, the mean
        teacher advantage, and the counts of nodes and questions."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name in self.signals:
            out[name] = {}
            for split in ("correct", "incorrect", "all"):
                nodes = [n for n in self.nodes if split == "all" or n.correct == (split == "correct")]
                cos = _per_question([n.cos[name] for n in nodes], nodes)
                adv = _per_question([n.advantage[name] for n in nodes], nodes)
                low, high = _bootstrap(list(cos.values()), self.bootstrap, self.seed)
                out[name][split] = {
                    "alignment": statistics.fmean(cos.values()) if cos else math.nan,
                    "alignment_low": low, "alignment_high": high,
                    "teacher_advantage": statistics.fmean(adv.values()) if adv else math.nan,
                    "nodes": float(sum(not math.isnan(n.cos[name]) for n in nodes)), "questions": float(len(cos)),
                }
        return out

    def by_depth(self) -> dict[str, dict[str, dict[int, float]]]:
        """Mean alignment per signal, per split (``correct``, ``incorrect``), per depth bucket
        ``0, 1, 2-3, 4-7, ...`` (keyed by its first depth), so the per-token rollouts' extra
        depths join the exponentially spaced ones."""
        out: dict[str, dict[str, dict[int, float]]] = {}
        for name in self.signals:
            out[name] = {}
            for split in ("correct", "incorrect"):
                rows: dict[int, list[float]] = {}
                for n in self.nodes:
                    if n.correct == (split == "correct") and not math.isnan(n.cos[name]):
                        rows.setdefault(depth_bucket(n.depth), []).append(n.cos[name])
                out[name][split] = {d: statistics.fmean(v) for d, v in sorted(rows.items())}
        return out

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``report.json`` (settings, summary, by depth, every node) and ``nodes.csv``."""
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        report = {
            "quantity": f"cosine(ideal gradient, distillation direction), {self.space} space",
            "samples": self.samples, "budget": self.budget, "nodes_skipped": self.nodes_skipped,
            "summary": self.summary(), "by_depth": self.by_depth(), "nodes": [asdict(n) for n in self.nodes],
        }
        (root / "report.json").write_text(json.dumps(report, indent=1, allow_nan=True))
        with (root / "nodes.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["problem_id", "rollout", "depth", "token", "correct", "value", "signal", "alignment", "teacher_advantage"])
            for n in self.nodes:
                for name in self.signals:
                    writer.writerow([n.problem_id, n.rollout, n.depth, n.token, int(n.correct), n.value, name, n.cos[name], n.advantage[name]])
        return {"json": root / "report.json", "csv": root / "nodes.csv"}


def _per_question(values: Sequence[float], nodes: Sequence[NodeRecord]) -> dict[str, float]:
    """The mean of each question's defined ``values`` (one per node)."""
    rows: dict[str, list[float]] = {}
    for n, v in zip(nodes, values):
        if not math.isnan(v):
            rows.setdefault(n.problem_id, []).append(v)
    return {pid: statistics.fmean(v) for pid, v in rows.items()}


def _bootstrap(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(f"{seed}:bootstrap")
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[math.ceil(0.975 * (resamples - 1))]


# --------------------------------------------------------------------------------- the estimator


@dataclass
class _Node:
    problem: Problem
    rollout: int
    prompt_ids: list[int]
    response: list[int]
    depth: int
    correct: bool
    candidates: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)


def measure_alignment(
    ctx: RolloutContext,
    problems: list[Problem],
    signals: Sequence[tuple[SignalConfig, Any]],
    settings: AlignmentSettings,
) -> AlignmentReport:
    """Score every signal's alignment on the student's own rollouts of ``problems`` (see the module
    doc). ``signals`` pairs each configuration with its teacher model (``ctx.student`` for a
    self-teacher). This rank's work only: no collective is called. Problems whose privileged
    context (for a signal that reads one) is over the prompt limit are left out."""
    privileged = [(ctx.source.privileged_context(), c.reveal_ratio) for c, _ in signals if c.reveal_ratio is not None]
    problems = ctx.fitting(problems, *(lambda p, c=c, r=r: c.reveal(p, r) for c, r in privileged))
    student, stops = ctx.student, set(ctx.prompts.stop_ids)
    sampling, used = settings.sampling, 0
    if len(problems) * settings.rollouts_per_problem > settings.budget:
        raise ValueError(
            f"settings.budget ({settings.budget}) is below the {len(problems) * settings.rollouts_per_problem} rollouts "
            "themselves: raise it or score fewer problems"
        )
    prompts = [ctx.encode_prompt(p.prompt) for p in problems]
    with ctx.seeded("alignment", "rollouts"):
        completions = ctx.engine_for(student).generate(prompts, settings.rollouts_per_problem, sampling)
    nodes: list[_Node] = []
    used += sum(len(group) for group in completions)
    for i, (problem, prompt_ids, group) in enumerate(zip(problems, prompts, completions)):
        for r, completion in enumerate(group):
            correct = ctx.reward(ctx.decode(completion.token_ids), problem.answer) > 0
            every = i * settings.rollouts_per_problem + r < settings.token_view_rollouts
            for depth in node_depths(len(completion.token_ids), every):
                nodes.append(_Node(problem, r, prompt_ids, completion.token_ids, depth, correct))
    # Shallow nodes of every rollout first, so a budget that runs out cuts depth, not questions.
    position = {id(n): k for k, n in enumerate(nodes)}
    nodes.sort(key=lambda n: (depth_bucket(n.depth), position[id(n)]))
    # The student at every node: one teacher-forced pass per rollout.
    rollouts = list({(id(n.response), n.problem.problem_id, n.rollout): n for n in nodes}.values())
    student_logp = _node_logprobs(ctx, student, rollouts, [r.prompt_ids for r in rollouts])
    kept, skipped = [], 0
    for node in nodes:
        logp = student_logp[(node.problem.problem_id, node.rollout)][node.depth]
        top = torch.topk(logp, min(settings.top_k, logp.numel())).indices.tolist()
        node.candidates = list(dict.fromkeys([*top, node.response[node.depth]]))
        last = node.depth + 1 >= sampling.max_new_tokens  # a candidate here ends the response: scored exactly
        cost = 0 if last else settings.continuations * sum(k not in stops for k in node.candidates)
        if used + cost > settings.budget:
            skipped += 1
            continue
        used += cost
        kept.append(node)
    _estimate_success(ctx, kept, settings)
    records = [
        NodeRecord(n.problem.problem_id, n.rollout, n.depth, ctx.decode([n.response[n.depth]]) or "<eos>", n.correct, math.nan, {}, {})
        for n in kept
    ]
    for config, teacher in signals:
        context = ctx.source.privileged_context() if config.reveal_ratio is not None else None
        teacher_prompts = [
            ctx.encode_prompt(context.reveal(r.problem, config.reveal_ratio)) if context is not None else r.prompt_ids  # type: ignore[arg-type]
            for r in rollouts
        ]
        teacher_logp = _node_logprobs(ctx, teacher, rollouts, teacher_prompts)
        for node, record in zip(kept, records):
            key = (node.problem.problem_id, node.rollout)
            s_logp, t_logp = student_logp[key][node.depth], teacher_logp[key][node.depth]
            idx = torch.tensor(node.candidates)
            success = torch.tensor(node.success)
            g_star, record.value = ideal_gradient(s_logp.exp()[idx], success)
            direction = distillation_direction(s_logp, t_logp, config.divergence)
            if settings.space == "parameter":
                record.cos[config.name] = _parameter_cosine(ctx, node, idx, g_star, direction)
            else:
                record.cos[config.name] = cosine(g_star, direction[idx])
            record.advantage[config.name] = teacher_advantage(t_logp.exp()[idx], s_logp.exp()[idx], success, record.value)
    return AlignmentReport(
        records, [c.name for c, _ in signals], used, settings.budget, skipped, settings.space, settings.bootstrap, ctx.seed
    )


def _node_logprobs(
    ctx: RolloutContext, model: Any, rollouts: list[_Node], prompts: list[list[int]]
) -> dict[tuple[str, int], Tensor]:
    """Per rollout, ``(len(response), V)`` log-probabilities of the next token at every depth."""
    logits = ctx.response_logits(model, prompts, [r.response for r in rollouts])
    parts = torch.log_softmax(logits, dim=-1).split([len(r.response) for r in rollouts])
    return {(r.problem.problem_id, r.rollout): part for r, part in zip(rollouts, parts)}


def _estimate_success(ctx: RolloutContext, nodes: list[_Node], settings: AlignmentSettings) -> None:
    """``P_succ`` of every candidate of every node: ``M`` student continuations after the
    candidate (batched per remaining length), or exactly for end-of-sequence."""
    stops = set(ctx.prompts.stop_ids)
    jobs: dict[int, list[tuple[_Node, int]]] = {}  # remaining tokens -> (node, candidate index)
    for node in nodes:
        node.success = [0.0] * len(node.candidates)
        for c, token in enumerate(node.candidates):
            if token in stops:
                node.success[c] = float(ctx.reward(ctx.decode(node.response[: node.depth]), node.problem.answer) > 0)
            else:
                remaining = settings.sampling.max_new_tokens - node.depth - 1
                jobs.setdefault(remaining, []).append((node, c))
    engine = ctx.engine_for(ctx.student)
    for remaining, batch in sorted(jobs.items()):
        prefixes = [n.response[: n.depth] + [n.candidates[c]] for n, c in batch]
        if remaining <= 0:  # the candidate is the last token allowed: the response ends there
            for (node, c), prefix in zip(batch, prefixes):
                node.success[c] = float(ctx.reward(ctx.decode(prefix), node.problem.answer) > 0)
            continue
        sampling = SamplingConfig(settings.sampling.temperature, settings.sampling.top_p, remaining, logprobs=False)
        with ctx.seeded("alignment", "continuations", remaining):
            outs = engine.generate([n.prompt_ids + p for (n, _), p in zip(batch, prefixes)], settings.continuations, sampling)
        for (node, c), prefix, group in zip(batch, prefixes, outs):
            hits = [ctx.reward(ctx.decode(prefix + g.token_ids), node.problem.answer) > 0 for g in group]
            node.success[c] = sum(hits) / len(hits)


def _parameter_cosine(ctx: RolloutContext, node: _Node, idx: Tensor, g_star: Tensor, direction: Tensor) -> float:
    """Cosine of the parameter gradients of ``g* . z`` (candidates) and ``d . z`` (every token)."""
    student = ctx.student
    params = [p for p in student.parameters() if p.requires_grad]
    ids = torch.tensor([node.prompt_ids + node.response[: node.depth]], device=ctx.device)
    was_training = student.training
    student.eval()
    try:
        with torch.enable_grad():
            z = student(input_ids=ids).logits[0, -1, : len(ctx.tokenizer)].float()
            ideal = torch.autograd.grad((g_star.to(z.device) * z[idx.to(z.device)]).sum(), params, retain_graph=True, allow_unused=True)
            distill = torch.autograd.grad((direction.to(z.device) * z).sum(), params, allow_unused=True)
    finally:
        student.train(was_training)
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]) for grads in (ideal, distill)]
    return cosine(flat[0], flat[1])
