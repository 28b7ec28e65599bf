"""How much a privileged context helps, and how far it moves the teacher from the student.

Two measurements over a reveal-ratio grid, for any model and problem set, through a
:class:`~lit_zpd.rollout.context.RolloutContext` (no trainer):

- :func:`accuracy_by_reveal`: greedy accuracy per skill of a model reading the problem alone and
  reading the privileged context at each ratio (can the model use the context at all?);
- :func:`mismatch_by_reveal`: ATESD's student-teacher mismatch, the mean per-token
  KL(p_T^a || p_S) over the vocabulary on the student's own sampled responses, where the teacher is
  ``teacher`` reading the context at ratio ``a`` and the student reads the problem alone.

``scripts/build_assets.py --check`` prints both for the embedded student (docs/atesd.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch

from lit_zpd.assets import resolve
from lit_zpd.loss_config import LossConfig
from lit_zpd.losses import generalized_jsd
from lit_zpd.model_files import load_causal_lm, load_tokenizer
from lit_zpd.report import summarize
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import RolloutEngine, SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.rollout.prompts import PromptFormat
from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lit_zpd.tasks.privileged import PrivilegedContext
from lit_zpd.tasks.problem import Problem, ProblemSource


def load_context(
    model: str, source: ProblemSource, max_new_tokens: int = 48, seed: int = 0,
    engine: Literal["hf", "vllm"] = "hf", vllm: VLLMSettings | None = None, prompt: PromptFormat = PromptFormat(),
) -> RolloutContext:
    """A context over one Hugging Face model directory (or ``embedded:student``), which is both
    student and teacher (a self-teacher), sampled with ``generate`` (or, with ``engine: vllm``, the
    student with vLLM), its prompts encoded under ``prompt``: for measurements outside a run."""
    path = resolve(model)
    tokenizer = load_tokenizer(path)
    weights = load_causal_lm(path).eval()

    def make_engine(m: Any) -> RolloutEngine:
        if engine == "vllm" and m is weights:
            return VLLMEngine(path, ctx.prompts.stop_ids, len(tokenizer), vllm)
        return HFEngine(m, tokenizer.pad_token_id, ctx.prompts.stop_ids, len(tokenizer))

    ctx = RolloutContext(
        student=weights, teacher=weights, tokenizer=tokenizer, source=source, seed=seed, loss=LossConfig(sft=1.0),
        engine_factory=make_engine, eval_sampling=SamplingConfig(max_new_tokens=max_new_tokens), prompt=prompt,
    )
    return ctx


def accuracy_by_reveal(
    ctx: RolloutContext, model: Any, problems: list[Problem], context: PrivilegedContext, ratios: list[float]
) -> dict[str, dict[str, float]]:
    """Greedy accuracy per skill (and ``all``): key ``"none"`` without a context, then one key per
    ratio (``"0.5"``) with the privileged context at that ratio. Problems whose widest context is
    over the prompt limit are left out of every column."""
    def greedy(rows: list[Problem]) -> dict[str, float]:
        return {k.removeprefix("greedy/"): v for k, v in summarize(ctx.evaluate(model, rows)).items() if k.startswith("greedy/")}

    problems = ctx.fitting(problems, lambda p: context.reveal(p, max(ratios, default=0.0)))
    out = {"none": greedy(problems)}
    for ratio in ratios:
        out[f"{ratio:g}"] = greedy([replace(p, prompt=context.reveal(p, ratio)) for p in problems])
    return out


@torch.no_grad()
def mismatch_by_reveal(
    ctx: RolloutContext,
    student: Any,
    teacher: Any,
    problems: list[Problem],
    context: PrivilegedContext,
    ratios: list[float],
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=48),
) -> dict[str, float]:
    """Mean per-token forward KL(p_T^a || p_S) on one sampled student response per problem, by
    ratio (``"0.5"``); the responses are sampled once (seeded) and shared by every ratio. Problems
    whose widest context is over the prompt limit are left out, as in :func:`accuracy_by_reveal`."""
    problems = ctx.fitting(problems, lambda p: context.reveal(p, max(ratios, default=0.0)))
    prompts = [ctx.encode_prompt(p.prompt) for p in problems]
    with ctx.seeded("mismatch_by_reveal"):
        responses = [c[0].token_ids for c in ctx.engine_for(student).generate(prompts, 1, sampling)]
    s_logits = ctx.response_logits(student, prompts, responses)
    out = {}
    for ratio in ratios:
        t_prompts = [ctx.encode_prompt(context.reveal(p, ratio)) for p in problems]
        t_logits = ctx.response_logits(teacher, t_prompts, responses)
        out[f"{ratio:g}"] = float(generalized_jsd(s_logits, t_logits, beta=0.0).mean())
    return out
