"""The papers' claims, tried on the embedded default: every method, baseline and combination over
several seeds at one student-token budget, written to a results page with plots.

    python scripts/replicate.py                          # the full table: docs/RESULTS.md
    python scripts/replicate.py --quick --out /tmp/rep   # a few steps of three arms (CI)

Every arm runs once per seed (``--seed_everything``) with a ``StudentTokenBudget`` of
``--budget`` student rollout tokens added, each config's ``trainer.max_steps`` staying the upper
bound (arms that never sample the student, such as SFT and KD, end there). The page gives, per arm,
the end accuracy per skill and overall as mean ± sample standard deviation over seeds, forgetting,
the share of the teacher's accuracy retained, the student tokens spent and the wall time (from
``scripts/run_experiments.py``), then one row per claim: *held* when the claimed arm's end
greedy accuracy is above every arm it is claimed to beat at the one-sided exact permutation test's
p <= ``--alpha`` (over the seeds' values: with 3 seeds an arm must beat all 3 of the other's, p =
0.05), *not held* when one of them is above it at that level, *inconclusive* otherwise. Plots:
accuracy against student rollout tokens (mean over seeds, band of one standard deviation) and
accuracy per skill at the start and the end of every arm. Numbers come from the runs the script
makes: each run's result is written to ``<out>/replication/<arm>-seed<k>.json`` as soon as it ends, and a
later call with the same settings takes the runs found there instead of repeating them, so a long
replication stopped part way goes on where it stopped (``--fresh`` runs everything again; a
result made with other settings is never taken).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from run_experiments import run, seed_table

# Arms: a config, or a config and its overlays joined by "+" (as run_experiments takes them).
BASELINES = ["sft", "kd", "gkd", "opd", "grpo", "opsd"]
METHODS = ["zppo", "paced", "ioa", "atesd"]
ABLATIONS = [
    "kd+with_replay/kd", "gkd+with_replay/gkd", "opd+with_replay/opd", "grpo+with_replay/grpo",
    "paced_ablations/hard_filter_two_stage", "paced_ablations/hard_filter_fkl", "paced_ablations/weighted_fkl",
    "paced_ablations/weighted_rkl", "paced_ablations/unweighted_two_stage", "atesd+exposure_sweep/fixed_1",
]
COMBINATIONS = ["zppo+combinations/zppo_paced", "ioa+combinations/ioa_paced", "ioa_zppo", "ioa_zppo+combinations/stacked"]
ARMS = [*BASELINES, *METHODS, *ABLATIONS, *COMBINATIONS]
QUICK_ARMS = ["grpo", "zppo", "grpo+with_replay/grpo"]


@dataclass(frozen=True)
class Claim:
    """A paper's claim that ``arm`` ends more accurate than each of ``beats``."""

    text: str
    arm: str
    beats: tuple[str, ...]


CLAIMS = [
    Claim("ZPPO beats GRPO and distillation", "zppo", ("grpo", "kd", "gkd", "opd")),
    Claim("replay alone is not enough: ZPPO beats every baseline with its replay buffer", "zppo",
          ("kd+with_replay/kd", "gkd+with_replay/gkd", "opd+with_replay/opd", "grpo+with_replay/grpo")),
    Claim("PACED's weighting beats the hard filter (same two stages)", "paced", ("paced_ablations/hard_filter_two_stage",)),
    Claim("PACED's weighting beats the hard filter (forward KL)", "paced_ablations/weighted_fkl", ("paced_ablations/hard_filter_fkl",)),
    Claim("forward-then-reverse KL is PACED's best schedule", "paced", ("paced_ablations/weighted_fkl", "paced_ablations/weighted_rkl")),
    Claim("IOA retains more of the teacher than distillation", "ioa", ("kd", "gkd")),
    Claim("ATESD beats full exposure of the reference", "atesd", ("atesd+exposure_sweep/fixed_1",)),
    Claim("ZPPO with PACED's weighting beats each alone", "zppo+combinations/zppo_paced", ("zppo", "paced")),
    Claim("IOA with PACED's weighting beats each alone", "ioa+combinations/ioa_paced", ("ioa", "paced")),
    Claim("the IOA curriculum with ZPPO's replay beats each alone", "ioa_zppo", ("ioa", "zppo")),
    Claim("the pedagogical callbacks stacked beat every single method", "ioa_zppo+combinations/stacked", tuple(METHODS)),
]


def permutation_p(higher: Sequence[float], lower: Sequence[float]) -> float:
    """One-sided exact permutation test of ``mean(higher) > mean(lower)``: the share of all
    relabellings of the pooled values whose difference of means is at least the observed one."""
    pooled, n = [*higher, *lower], len(higher)
    observed = statistics.fmean(higher) - statistics.fmean(lower)
    splits = list(itertools.combinations(range(len(pooled)), n))
    at_least = 0
    for chosen in splits:
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        at_least += statistics.fmean(a) - statistics.fmean(b) >= observed - 1e-12
    return at_least / len(splits)


def verdict(claim: Claim, accuracy: dict[str, list[float]], alpha: float) -> tuple[str, str]:
    """``(held | not held | inconclusive | not run, the evidence)`` of ``claim``."""
    if claim.arm not in accuracy or any(b not in accuracy for b in claim.beats):
        return "not run", ""
    mine, evidence, outcomes = accuracy[claim.arm], [], []
    for other in claim.beats:
        theirs = accuracy[other]
        better, worse = permutation_p(mine, theirs), permutation_p(theirs, mine)
        outcomes.append("held" if better <= alpha else "not held" if worse <= alpha else "inconclusive")
        evidence.append(f"vs {other}: {statistics.fmean(mine) - statistics.fmean(theirs):+.3f}, p = {better:.2f}")
    overall = "not held" if "not held" in outcomes else "held" if set(outcomes) == {"held"} else "inconclusive"
    return overall, "; ".join(evidence)


def mean_curve(results: list[dict[str, object]], arm: str) -> tuple[list[float], list[float], list[float]]:
    """Mean student tokens, mean and standard deviation of greedy accuracy at the start and at
    each evaluation of ``arm`` (those that every seed reached)."""
    curves = [[(0.0, r["start"]["greedy/all"]), *r["curve"]] for r in results if r["name"] == arm]
    length = min((len(c) for c in curves), default=0)
    tokens = [statistics.fmean(c[i][0] for c in curves) for i in range(length)]
    mean = [statistics.fmean(c[i][1] for c in curves) for i in range(length)]
    sd = [statistics.stdev([c[i][1] for c in curves]) if len(curves) > 1 else 0.0 for i in range(length)]
    return tokens, mean, sd


def plots(results: list[dict[str, object]], arms: list[str], out: Path) -> list[Path]:
    """``accuracy_vs_tokens.png`` and ``accuracy_by_skill.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_zpd.figures import accuracy_by_skill

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for i, arm in enumerate(arms):
        tokens, mean, sd = mean_curve(results, arm)
        if tokens:
            ax.plot(tokens, mean, color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=arm)
            ax.fill_between(tokens, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=f"C{i % 10}", alpha=0.15)
    ax.set_xlabel("student rollout tokens")
    ax.set_ylabel("validation greedy accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths = [out / "accuracy_vs_tokens.png", out / "accuracy_by_skill.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    def mean_summary(runs: list[dict[str, object]], when: str) -> dict[str, float]:
        keys = [k for k in runs[0][when] if k.startswith("greedy/")]
        return {k: statistics.fmean(r[when][k] for r in runs) for k in keys}

    ran = [arm for arm in arms if any(r["name"] == arm for r in results)]
    start = mean_summary(results, "start")  # every arm starts from the same student
    columns = {"student (start)": start} | {
        f"{arm} (end)": mean_summary([r for r in results if r["name"] == arm], "end") for arm in ran
    }
    fig = accuracy_by_skill(columns)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def page(results: list[dict[str, object]], arms: list[str], seeds: list[int], command: str, alpha: float, budget: int) -> str:
    minutes = sum(r["minutes"] for r in results)  # a replication made over several calls: all its runs
    accuracy = {arm: [r["end"]["greedy/all"] for r in results if r["name"] == arm] for arm in arms}
    claims = ["| claim | arm | verdict | evidence (difference of mean greedy accuracy, permutation p) |", "|---|---|---|---|"]
    for claim in CLAIMS:
        held, evidence = verdict(claim, accuracy, alpha)
        claims.append(f"| {claim.text} | {claim.arm} | {held} | {evidence} |")
    return "\n".join([
        "# Results on the embedded default",
        "",
        (f"Made by `{command}` on this machine, {len(results)} of its {len(arms) * len(seeds)} runs ({len(arms)} arms x seeds {seeds}) taking {minutes:.1f} minutes in all, a budget of "
         f"{budget} student rollout tokens per run (each config's `trainer.max_steps` the upper bound)."),
        "Accuracy is on the validation split at the end of each run; cells are mean ± sample standard deviation over seeds.",
        "",
        seed_table(results, ()),
        "",
        f"## The papers' claims (one-sided exact permutation test over seeds, held at p <= {alpha})",
        "",
        *claims,
        "",
        "![accuracy against student rollout tokens](accuracy_vs_tokens.png)",
        "",
        "![accuracy per skill at the start and the end](accuracy_by_skill.png)",
        "",
    ])


def kept_run(folder: Path, arm: str, seed: int, overrides: list[str]) -> dict[str, object]:
    """The result of ``arm`` at ``seed``: the one kept in ``folder`` when it was made with the same
    overrides, else a new run (then kept there)."""
    path = folder / f"{arm.replace('/', '__')}-seed{seed}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("overrides") == overrides:
            print(f"replicate: {arm} seed {seed} taken from {path}", file=sys.stderr)
            return kept["result"]
    result = run(arm, overrides, seed)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overrides": overrides, "result": result}, indent=1))
    return json.loads(path.read_text())["result"]  # as a kept one reads: the page cannot depend on which


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", help=f"arms to run (default: all {len(ARMS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=600_000, help="student rollout tokens per run (ZPPO's own budget)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the claims' test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where RESULTS.md and the plots go")
    parser.add_argument("--override", action="append", default=[], help="a lit-zpd argument for every run")
    parser.add_argument("--quick", action="store_true", help="three arms, two seeds, a few steps: checks the script")
    parser.add_argument("--fresh", action="store_true", help="run every arm again, ignoring the results kept under <out>/replication")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs" / "replicate", help="the runs' TensorBoard logs and checkpoints")
    args = parser.parse_args(argv)
    arms = args.arms or (QUICK_ARMS if args.quick else ARMS)
    seeds = args.seeds if not args.quick or args.seeds != [0, 1, 2] else [0, 1]
    overrides = [
        "--trainer.callbacks+=lit_zpd.callbacks.budget.StudentTokenBudget",
        f"--trainer.callbacks.max_student_tokens={args.budget}",
        f"--trainer.logger.init_args.save_dir={args.logs}",
        *(["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--data.prompts_per_step=4",
           "--data.eval_samples=2", "--data.source=lit_zpd.tasks.ArithmeticCurriculum",
           "--data.source.max_eval_per_skill=2"] if args.quick else []),
        *args.override,
    ]
    folder = args.out / "replication"
    if args.fresh:
        for kept in folder.glob("*-seed*.json"):
            kept.unlink()
    command = "python scripts/replicate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = args.out / "RESULTS.md"
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    for seed in seeds:
        for arm in arms:
            results.append(kept_run(folder, arm, seed, overrides))
            # The page after every run: a replication stopped part way shows what it has.
            plots(results, arms, args.out)
            path.write_text(page(results, arms, seeds, command.strip(), args.alpha, args.budget))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
