"""Run configs one after another on the embedded default and tabulate start and end accuracy.

    python scripts/run_experiments.py sft kd gkd opd grpo --out docs/baselines.md
    python scripts/run_experiments.py paced paced_ablations/unweighted_fkl \
        --override=--model.optimizer.init_args.lr=0.0001 --out docs/paced_lr1e-4.md

Each name is a config under configs/ (without .yaml); every ``--override`` is passed to each run's
command line after the config. For every run the table gives its wall time on this machine, the
student rollout tokens it spent, and the student's validation accuracy before and after training:
greedy accuracy per skill and overall, the mean accuracy over 8 samples at temperature 1.0, and
forgetting: of the validation problems the student solved greedily at the start, the share it
fails at the end. Numbers come from the runs the script makes; nothing is cached.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_zpd.callbacks.report import AccuracyReport  # noqa: E402
from lit_zpd.cli import main as lit_zpd  # noqa: E402
from lit_zpd.tasks.arithmetic import SKILL_GRAPH  # noqa: E402


def run(name: str, overrides: list[str]) -> dict[str, object]:
    start = time.time()
    config = ROOT / "configs" / f"{name}.yaml"
    cli = lit_zpd(["fit", f"--config={config}", "--trainer.enable_progress_bar=false", *overrides])
    report = next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyReport))
    return {
        "name": name,
        "minutes": (time.time() - start) / 60,
        "steps": cli.trainer.global_step,
        "student_tokens": cli.datamodule.counters.student_tokens,
        "start": report.start["student"],
        "end": report.end["student"],
        "teacher": report.start.get("teacher", {}),
        # Callbacks that keep run-level counters (e.g. the ZPPO replay buffer) report them too.
        "callbacks": {type(c).__name__: c.summary() for c in cli.trainer.callbacks if hasattr(c, "summary")},
    }


def table(results: list[dict[str, object]]) -> str:
    skills = [*SKILL_GRAPH, "all"]
    head = "| config | steps | student rollout tokens | minutes | " + " | ".join(f"{s} greedy" for s in skills) + " | all mean@8 | forgotten |"
    rule = "|" + "---|" * (len(skills) + 6)
    rows = []
    for r in results:
        start, end = r["start"], r["end"]
        cells = [f"{start[f'greedy/{s}']:.2f} → {end[f'greedy/{s}']:.2f}" for s in skills]
        mean_k = f"{start['mean_at_k/all']:.2f} → {end['mean_at_k/all']:.2f}"
        forgot = f"{end['forgotten/all']:.2f} of {end['solved_before/all']:.0f}"
        rows.append(
            f"| {r['name']} | {r['steps']} | {r['student_tokens']} | {r['minutes']:.1f} | "
            + " | ".join(cells)
            + f" | {mean_k} | {forgot} |"
        )
    teacher = next((r["teacher"] for r in results if r["teacher"]), None)
    if teacher:
        cells = [f"{teacher[f'greedy/{s}']:.2f}" for s in skills]
        rows.append("| teacher (reference) | | | | " + " | ".join(cells) + f" | {teacher['mean_at_k/all']:.2f} | |")
    notes = [
        f"- {r['name']}, {name}: " + ", ".join(f"{k} {v:g}" for k, v in summary.items())
        for r in results
        for name, summary in r["callbacks"].items()
    ]
    return "\n".join([head, rule, *rows] + (["", *notes] if notes else []))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config names under configs/, e.g. sft gkd")
    parser.add_argument(
        "--override", action="append", default=[], help="a lit-zpd argument for every run, e.g. --override=--trainer.max_steps=50"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    results = [run(name, args.override) for name in args.configs]
    text = table(results)
    if args.override:
        text = f"Overrides: `{' '.join(args.override)}`\n\n" + text
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
