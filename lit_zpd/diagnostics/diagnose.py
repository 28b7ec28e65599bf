"""``lit-zpd diagnose``: the gradient alignment diagnostic from a YAML file, before a training run.

    lit-zpd diagnose --config configs/diagnose/embedded.yaml

It samples the student's rollouts of ``num_problems`` problems of a split, scores every signal
(:mod:`lit_zpd.diagnostics.alignment`) and writes to ``out_dir``: ``report.json`` (settings,
summary per signal and split with bootstrap intervals, alignment by depth, every node),
``nodes.csv``, ``alignment_by_depth.png`` and one ``tokens_<signal>.png`` per signal (the first
rollout's tokens coloured by their node's alignment). A summary table is printed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_zpd.assets import resolve
from lit_zpd.diagnostics.alignment import AlignmentReport, AlignmentSettings, SignalConfig, measure_alignment
from lit_zpd.diagnostics.exposure import load_context
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.prompts import PromptFormat
from lit_zpd.rollout.vllm_engine import VLLMSettings
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import Problem, ProblemSource, Split
from lit_zpd.teacher import load_teacher


def spread_over_skills(problems: Sequence[Problem], n: int) -> list[Problem]:
    """The first ``n`` problems taken round-robin over skills (in the order the skills appear)."""
    by_skill: dict[str, list[Problem]] = {}
    for p in problems:
        by_skill.setdefault(p.skill, []).append(p)
    out: list[Problem] = []
    while len(out) < n and any(by_skill.values()):
        for rows in by_skill.values():
            if rows and len(out) < n:
                out.append(rows.pop(0))
    return out


def diagnose(
    student: str = "embedded:student",
    signals: list[SignalConfig] | None = None,
    source: ProblemSource | None = None,
    split: Split = "validation",
    num_problems: int = 16,
    settings: AlignmentSettings | None = None,
    out_dir: str = "logs/diagnose",
    seed: int = 0,
    engine: Literal["hf", "vllm"] = "hf",
    vllm: VLLMSettings | None = None,
    prompt: PromptFormat = PromptFormat(),
) -> AlignmentReport:
    """Run the diagnostic and write its report and plots.

    Args:
        student: The student's model directory, or ``embedded:student``.
        signals: The distillation signals to score; the embedded teacher with reverse KL if ``None``.
            A signal's ``teacher`` takes what ``model.teacher`` takes (``self_live`` is the
            student itself, for a privileged self-teacher).
        source: The problem source; the embedded curriculum if ``None``.
        split: Where the problems come from.
        num_problems: Problems scored, taken round-robin over skills.
        settings: Sampling, candidates, budget and the cosine's space.
        out_dir: Where the report and the plots go.
        seed: Seeds the rollouts, the continuations and the bootstrap.
        engine: Samples the student's rollouts and continuations: ``hf`` (``generate``) or
            ``vllm`` (prefix caching shares the prompt and prefix of a node's continuations;
            ``settings.sampling.top_p`` must be 1).
        vllm: Options of the ``vllm`` engine.
        prompt: How prompts become tokens (chat template, length limit, stop tokens), as
            ``data.prompt`` in a run.
    """
    if engine not in ("hf", "vllm"):
        raise ValueError(f"engine must be hf or vllm, got {engine!r}")
    signals = signals or [SignalConfig("teacher")]
    names = [s.name for s in signals]
    if len(set(names)) != len(names):
        raise ValueError(f"signals: names must differ, got {names}")
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    settings = settings or AlignmentSettings()
    source = source or ArithmeticCurriculum()
    ctx = load_context(student, source, settings.sampling.max_new_tokens, seed, engine, vllm, prompt)
    teachers: dict[str, Any] = {}
    for signal in signals:
        if signal.teacher not in teachers:
            teachers[signal.teacher] = load_teacher(resolve(signal.teacher), ctx.student, ctx.tokenizer)
    problems = spread_over_skills(ctx.problems(split), num_problems)
    report = measure_alignment(ctx, problems, [(s, teachers[s.teacher]) for s in signals], settings)
    write_report(report, ctx, out_dir)
    print(summary_table(report))
    return report


def write_report(report: AlignmentReport, ctx: RolloutContext, out_dir: str | Path) -> list[Path]:
    """The report files and the plots; returns their paths."""
    from lit_zpd.figures import alignment_by_depth, token_alignment  # matplotlib only where plots are drawn

    root = Path(out_dir)
    paths = list(report.write(root).values())
    figure = alignment_by_depth(report.by_depth())
    figure.savefig(root / "alignment_by_depth.png")
    paths.append(root / "alignment_by_depth.png")
    first = [n for n in report.nodes if (n.problem_id, n.rollout) == (report.nodes[0].problem_id, report.nodes[0].rollout)] if report.nodes else []
    for name in report.signals:
        if not first:
            break
        depths = {n.depth: n for n in first}
        tokens = [depths[d].token if d in depths else "·" for d in range(max(depths) + 1)]
        scores = [depths[d].cos[name] if d in depths else math.nan for d in range(max(depths) + 1)]
        verdict = "correct" if first[0].correct else "incorrect"
        title = f"{name}: {first[0].problem_id}, rollout {first[0].rollout} ({verdict})"
        token_alignment(tokens, scores, title).savefig(root / f"tokens_{name}.png")
        paths.append(root / f"tokens_{name}.png")
    return paths


def summary_table(report: AlignmentReport) -> str:
    """One line per signal and split: mean alignment [95% interval], teacher advantage, counts."""
    lines = [
        (
            f"gradient alignment ({report.space} space), {report.samples} student samples of {report.budget}, "
            f"{report.nodes_skipped} nodes skipped for the budget"
        ),
        f"{'signal':<22} {'rollouts':<10} {'alignment':>9} {'95% interval':>17} {'A_T':>8} {'nodes':>6} {'questions':>9}",
    ]
    for name, splits in report.summary().items():
        for split, row in splits.items():
            interval = f"[{row['alignment_low']:.3f}, {row['alignment_high']:.3f}]"
            lines.append(
                f"{name:<22} {split:<10} {row['alignment']:>9.3f} {interval:>17} {row['teacher_advantage']:>8.3f} "
                f"{row['nodes']:>6.0f} {row['questions']:>9.0f}"
            )
    return "\n".join(lines)


def main(args: list[str] | None = None) -> AlignmentReport:
    """``lit-zpd diagnose [--config FILE] [--key value ...]``."""
    parser = ArgumentParser(prog="lit-zpd diagnose", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the arguments below")
    parser.add_function_arguments(diagnose)
    config = parser.parse_args(args)
    init = parser.instantiate_classes(config).as_dict()
    init.pop("config", None)
    return diagnose(**init)
