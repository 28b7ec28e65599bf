"""Run configs one after another on the embedded default and tabulate start and end accuracy.

    python scripts/run_experiments.py sft kd gkd opd grpo --out docs/baselines.md
    python scripts/run_experiments.py paced paced_ablations/unweighted_fkl \
        --override=--model.optimizer.init_args.lr=0.0001 --out docs/paced_lr1e-4.md
    python scripts/run_experiments.py opsd atesd atesd+exposure_sweep/random --seeds 0 1 2 \
        --scalars train/forward_kl_unclipped exposure/reveal_ratio --out docs/atesd_runs.md

Each name is a config under configs/ (without .yaml), or several joined by ``+`` (later ones are
overlays, e.g. ``atesd+exposure_sweep/fixed_0.5``); every ``--override`` is passed to each run's
command line after the configs. With ``--seeds`` every config runs once per seed
(``--seed_everything``) and a second table gives the mean and the spread (sample standard deviation)
over seeds, with the share of the teacher's greedy accuracy the student retains at the end
(``retained``); ``--scalars`` adds the run-mean of logged TensorBoard scalars. For every run the table
gives its wall time on this machine, the student rollout tokens it spent, and the student's validation accuracy before and after training:
greedy accuracy per skill and overall (and, for each evaluation during the run, the student
rollout tokens spent by then: ``curve``), the mean accuracy over k samples (``data.eval_samples``) at temperature 1.0, and
forgetting: of the validation problems the student solved greedily at the start, the share it
fails at the end. Numbers come from the runs the script makes; nothing is cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lit_zpd.callbacks.report import AccuracyReport  # noqa: E402
from lit_zpd.cli import main as lit_zpd  # noqa: E402
from lit_zpd.tasks.arithmetic import SKILL_GRAPH  # noqa: E402


def run(name: str, overrides: list[str], seed: int | None = None, scalars: tuple[str, ...] = ()) -> dict[str, object]:
    start = time.time()
    configs = [f"--config={ROOT / 'configs' / f'{part}.yaml'}" for part in name.split("+")]
    seeded = [f"--seed_everything={seed}"] if seed is not None else []
    cli = lit_zpd(["fit", *configs, "--trainer.enable_progress_bar=false", *seeded, *overrides])
    report = next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyReport))
    return {
        "name": name,
        "seed": seed,
        "minutes": (time.time() - start) / 60,
        "steps": cli.trainer.global_step,
        "eval_samples": cli.datamodule.eval_samples,
        "student_tokens": cli.datamodule.counters.student_tokens,
        "start": report.start["student"],
        "end": report.end["student"],
        "teacher": report.start.get("teacher", {}),
        # Callbacks that keep run-level counters (e.g. the ZPPO replay buffer) report them too.
        "callbacks": {type(c).__name__: c.summary() for c in cli.trainer.callbacks if hasattr(c, "summary")},
        "scalars": run_means(cli.trainer.logger.log_dir, scalars) if scalars and cli.trainer.logger else {},
        "curve": accuracy_curve(cli.trainer.logger.log_dir) if cli.trainer.logger else [],
    }


def accuracy_curve(log_dir: str) -> list[tuple[float, float]]:
    """``(student rollout tokens spent, validation greedy accuracy)`` at each evaluation of a run."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    if "eval/greedy/all" not in available:
        return []
    spent = [(e.step, e.value) for e in events.Scalars("rollout/student_tokens_total")] if "rollout/student_tokens_total" in available else []
    return [
        (max((tokens for step, tokens in spent if step <= e.step), default=0.0), e.value)
        for e in events.Scalars("eval/greedy/all")
    ]


def run_means(log_dir: str, tags: tuple[str, ...]) -> dict[str, float]:
    """The mean over the run of each logged scalar ``tag`` (absent tags are left out)."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    return {tag: statistics.fmean(e.value for e in events.Scalars(tag)) for tag in tags if tag in available}


def _k(results: list[dict[str, object]]) -> str:
    """The number of samples behind the mean accuracy ("k" when the runs differ)."""
    ks = {r.get("eval_samples") for r in results}
    return str(ks.pop()) if len(ks) == 1 else "k"


def mean_sd(values: list[float]) -> str:
    """``mean ± sample standard deviation`` (0 for one value; empty for none)."""
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def seed_table(results: list[dict[str, object]], scalars: tuple[str, ...], teacher: float | None = None) -> str:
    """Mean and spread over seeds, one row per config; ``retained`` is over ``teacher`` (a greedy
    accuracy) when it is given, else over each run's own teacher at the start."""
    skills = [*SKILL_GRAPH, "all"]
    names = list(dict.fromkeys(str(r["name"]) for r in results))
    head = "| config | seeds | minutes | student rollout tokens | " + " | ".join(f"{s} greedy" for s in skills)
    head += f" | all mean@{_k(results)} | forgotten | retained |" + "".join(f" {t} |" for t in scalars)
    rule = "|" + "---|" * (len(skills) + 7 + len(scalars))
    rows = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        cells = [mean_sd([r["end"][f"greedy/{s}"] for r in runs]) for s in skills]
        cells += [mean_sd([r["end"]["mean_at_k/all"] for r in runs]), mean_sd([r["end"]["forgotten/all"] for r in runs])]
        retained = [r["end"]["greedy/all"] / (teacher or r["teacher"]["greedy/all"]) for r in runs if teacher or r["teacher"]]
        cells.append(mean_sd(retained) if retained else "")
        cells += [mean_sd([r["scalars"][t] for r in runs if t in r["scalars"]]) if any(t in r["scalars"] for r in runs) else "" for t in scalars]
        minutes = statistics.fmean(r["minutes"] for r in runs)
        tokens = statistics.fmean(r["student_tokens"] for r in runs)
        rows.append(f"| {name} | {len(runs)} | {minutes:.1f} | {tokens:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def table(results: list[dict[str, object]]) -> str:
    skills = [*SKILL_GRAPH, "all"]
    scalars = list(dict.fromkeys(t for r in results for t in r.get("scalars", {})))
    head = "| config | steps | student rollout tokens | minutes | " + " | ".join(f"{s} greedy" for s in skills) + f" | all mean@{_k(results)} | forgotten |"
    head += "".join(f" {t} |" for t in scalars)
    rule = "|" + "---|" * (len(skills) + 6 + len(scalars))
    rows = []
    for r in results:
        start, end = r["start"], r["end"]
        cells = [f"{start[f'greedy/{s}']:.2f} → {end[f'greedy/{s}']:.2f}" for s in skills]
        mean_k = f"{start['mean_at_k/all']:.2f} → {end['mean_at_k/all']:.2f}"
        forgot = f"{end['forgotten/all']:.2f} of {end['solved_before/all']:.0f}"
        label = r["name"] if r.get("seed") is None else f"{r['name']} (seed {r['seed']})"
        rows.append(
            f"| {label} | {r['steps']} | {r['student_tokens']} | {r['minutes']:.1f} | "
            + " | ".join(cells)
            + f" | {mean_k} | {forgot} |"
            + "".join(f" {r['scalars'][t]:.4f} |" if t in r.get("scalars", {}) else " |" for t in scalars)
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
    parser.add_argument("--seeds", type=int, nargs="+", help="run every config once per seed")
    parser.add_argument("--scalars", nargs="+", default=[], help="TensorBoard scalars to average over each run")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    scalars = tuple(args.scalars)
    results = [run(name, args.override, seed, scalars) for seed in (args.seeds or [None]) for name in args.configs]
    text = table(results)
    if args.seeds:
        text = seed_table(results, scalars) + "\n\nEvery run:\n\n" + text
    if args.override:
        text = f"Overrides: `{' '.join(args.override)}`\n\n" + text
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
