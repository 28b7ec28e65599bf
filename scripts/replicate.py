"""The papers' claims, tried on the embedded default: every method, baseline, ablation and
combination over several seeds at one student-token budget, written to a results page with plots.

    python scripts/replicate.py                          # the full table: docs/RESULTS.md
    python scripts/replicate.py --quick --out /tmp/rep   # a few steps of three arms (CI)

Every arm runs once per seed (``--seed_everything``) with a ``StudentTokenBudget`` of
``--budget`` student rollout tokens added, each config's ``trainer.max_steps`` staying the upper
bound (arms that never sample the student, such as SFT and KD, end there; GKD and OPD also run
with ``configs/token_budget/uncapped.yaml`` so that they spend the whole budget). The gradient
alignment diagnostic (``lit-zpd diagnose``) runs once per seed as well. The page gives, per arm,
the end accuracy per skill and overall as mean ± sample standard deviation over seeds, forgetting,
the share of the teacher's accuracy retained, the student tokens spent and the wall time (from
``scripts/run_experiments.py``); per alignment signal, its alignment on correct and incorrect
rollouts; then one row per claim: *held* when the claimed value (an arm's end greedy accuracy, a
signal's alignment on incorrect rollouts) is above every value it is claimed to beat at the
one-sided exact permutation test's p <= ``--alpha`` over the seeds (with 3 seeds all 3 must be
above all 3 of the other's: p = 0.05), *not held* when one of them is above it at that level,
*inconclusive* otherwise. Plots: accuracy against student rollout tokens (mean over seeds, band
of one standard deviation) and every arm's end accuracy per skill with its change from the start.

Numbers come from the runs the script makes. Each run's result is written to
``<out>/replication/<arm>-seed<k>.json`` as soon as it ends and the page is rewritten after every
run; a later call with the same settings takes the runs found there instead of repeating them,
so a long replication stopped part way goes on where it stopped (``--fresh`` runs everything
again; a result made with other settings is never taken; ``--page_only`` rewrites the page and the
plots from the kept results and runs nothing). The diagnostic runs first, then the
arms one at a time over all seeds, those of the claims first, so a stopped replication has
decided the claims on the arms it reached. Nothing else should run on the machine meanwhile: the
page reports wall times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import yaml
from run_experiments import mean_sd, run, seed_table

# Arms: a config, or a config and its overlays joined by "+" (as run_experiments takes them).
BASELINES = ["sft", "kd", "gkd", "opd", "grpo", "opsd"]
# GKD and OPD as shipped spend a fraction of the budget in their 150 steps; these run until they spend it.
AT_BUDGET = ["gkd+token_budget/uncapped", "opd+token_budget/uncapped"]
METHODS = ["zppo", "paced", "ioa", "atesd"]
ABLATIONS = [
    "kd+with_replay/kd", "gkd+with_replay/gkd", "opd+with_replay/opd", "grpo+with_replay/grpo",
    "paced_ablations/hard_filter_two_stage", "paced_ablations/hard_filter_fkl", "paced_ablations/weighted_fkl",
    "paced_ablations/weighted_rkl", "paced_ablations/unweighted_two_stage", "atesd+exposure_sweep/fixed_1",
]
COMBINATIONS = ["zppo+combinations/zppo_paced", "ioa+combinations/ioa_paced", "ioa_zppo", "ioa_zppo+combinations/stacked"]
ARMS = [*BASELINES, *AT_BUDGET, *METHODS, *ABLATIONS, *COMBINATIONS]
KINDS = {
    **dict.fromkeys(BASELINES, "baseline"), **dict.fromkeys(AT_BUDGET, "baseline, whole budget"),
    **dict.fromkeys(METHODS, "method"), **dict.fromkeys(ABLATIONS, "ablation"), **dict.fromkeys(COMBINATIONS, "combination"),
}
QUICK_ARMS = ["grpo", "zppo", "grpo+with_replay/grpo"]


@dataclass(frozen=True)
class Claim:
    """A paper's claim that ``arm`` ends more accurate than each of ``beats``."""

    text: str
    arm: str
    beats: tuple[str, ...]


CLAIMS = [
    Claim("ZPPO beats GRPO and distillation (GKD and OPD at the same budget)", "zppo", ("grpo", "kd", *AT_BUDGET)),
    Claim("ZPPO beats GKD and OPD as shipped (150 steps)", "zppo", ("gkd", "opd")),
    Claim("replay alone is not enough: ZPPO beats every baseline with its replay buffer", "zppo",
          ("kd+with_replay/kd", "gkd+with_replay/gkd", "opd+with_replay/opd", "grpo+with_replay/grpo")),
    Claim("PACED's weighting beats no weighting (same two stages)", "paced", ("paced_ablations/unweighted_two_stage",)),
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


# The gradient alignment diagnostic, once per seed: does each signal align better with the ideal
# gradient on the student's incorrect rollouts than on its correct ones (seed 002's finding)?
# 120 validation problems and a budget of 150k student samples, as in docs/alignment.md.
ALIGNMENT_CONFIG = ROOT / "configs" / "diagnose" / "embedded.yaml"
ALIGNMENT_ARGS = ["--num_problems=120", "--settings.budget=150000"]
QUICK_ALIGNMENT_ARGS = ["--num_problems=5", "--settings.budget=2000", "--settings.bootstrap=10"]
SIGNALS = [signal["name"] for signal in yaml.safe_load(ALIGNMENT_CONFIG.read_text())["signals"]]
ALIGNMENT_CLAIMS = [
    Claim(f"alignment is higher on incorrect rollouts ({signal})", f"alignment/{signal}/incorrect", (f"alignment/{signal}/correct",))
    for signal in SIGNALS
]


def alignment_run(args: list[str], seed: int, out_dir: Path) -> dict[str, object]:
    """``lit-zpd diagnose`` on ``configs/diagnose/embedded.yaml`` at ``seed``: per signal and
    split (correct, incorrect, all), the mean alignment over questions and the teacher advantage."""
    from lit_zpd.diagnostics.diagnose import main as diagnose

    start = time.time()
    report = diagnose([f"--config={ALIGNMENT_CONFIG}", *args, f"--seed={seed}", f"--out_dir={out_dir}"])
    return {"name": "alignment", "seed": seed, "minutes": (time.time() - start) / 60, "samples": report.samples, "summary": report.summary()}


def alignment_values(runs: list[dict[str, object]], key: str = "alignment") -> dict[str, list[float]]:
    """``{"alignment/<signal>/<split>": [its mean alignment (or ``key``) at each seed]}``; a split
    a seed's rollouts never reached (no incorrect rollout, say) is left out of that seed."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for signal, splits in r["summary"].items():
            for split, row in splits.items():
                if row["questions"] > 0:
                    values.setdefault(f"alignment/{signal}/{split}", []).append(row[key])
    return values


def alignment_table(runs: list[dict[str, object]]) -> str:
    """Per signal: alignment on correct and incorrect rollouts, their difference, and the teacher
    advantage, each mean ± sample standard deviation over seeds."""
    alignment, advantage = alignment_values(runs), alignment_values(runs, "teacher_advantage")
    rows = ["| signal | seeds | correct rollouts | incorrect rollouts | incorrect − correct | A_T correct | A_T incorrect |", "|---|---|---|---|---|---|---|"]
    for signal in dict.fromkeys(s for r in runs for s in r["summary"]):
        both = alignment_values([r for r in runs if all(r["summary"][signal][split]["questions"] > 0 for split in ("correct", "incorrect"))])
        gap = [i - c for i, c in zip(both.get(f"alignment/{signal}/incorrect", []), both.get(f"alignment/{signal}/correct", []), strict=True)]  # paired: runs with both splits
        cells = [mean_sd(values.get(f"alignment/{signal}/{split}", [])) for values in (alignment, advantage) for split in ("correct", "incorrect")]
        rows.append(f"| {signal} | {len(runs)} | {cells[0]} | {cells[1]} | {mean_sd(gap)} | {cells[2]} | {cells[3]} |")
    return "\n".join(rows)


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


def verdict(claim: Claim, values: dict[str, list[float]], alpha: float) -> tuple[str, str]:
    """``(held | not held | inconclusive | not run, the evidence)`` of ``claim``."""
    if claim.arm not in values or any(b not in values for b in claim.beats):
        return "not run", ""
    mine, evidence, outcomes = values[claim.arm], [], []
    for other in claim.beats:
        theirs = values[other]
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
    """``accuracy_vs_tokens.png`` (baselines and methods in one panel, ablations and combinations
    in the other) and ``accuracy_by_skill.png`` (every arm's end accuracy per skill, mean over
    seeds, and its change from the start) under ``out``."""
    from matplotlib import pyplot as plt

    from lit_zpd.figures import accuracy_curves, skill_grid

    ran = [arm for arm in arms if any(r["name"] == arm for r in results)]
    if not ran:
        return []
    single = [*BASELINES, *METHODS, *AT_BUDGET]
    panels = {
        "baselines and methods": {arm: mean_curve(results, arm) for arm in ran if arm in single},
        "ablations and combinations": {arm: mean_curve(results, arm) for arm in ran if arm not in single},
    }
    paths = [out / "accuracy_vs_tokens.png", out / "accuracy_by_skill.png"]
    figure = accuracy_curves({title: curves for title, curves in panels.items() if curves})
    figure.savefig(paths[0])
    plt.close(figure)

    def mean_summary(runs: list[dict[str, object]], when: str) -> dict[str, float]:
        keys = [k for k in runs[0][when] if k.startswith("greedy/")]
        return {k: statistics.fmean(r[when][k] for r in runs) for k in keys}

    start = mean_summary(results, "start")  # every arm starts from the same student
    ends = {arm: mean_summary([r for r in results if r["name"] == arm], "end") for arm in ran}
    figure = skill_grid(start, ends, "greedy accuracy per skill at the end, mean over seeds (change from the start)")
    figure.savefig(paths[1])
    plt.close(figure)
    return paths


def teacher_of(arm: str) -> str | None:
    """The ``model.teacher`` of ``arm``'s configs (a later overlay's wins)."""
    teacher = None
    for part in arm.split("+"):
        model = yaml.safe_load((ROOT / "configs" / f"{part}.yaml").read_text()).get("model") or {}
        teacher = model.get("teacher", teacher)
    return teacher


def reference_teacher(results: list[dict[str, object]]) -> float | None:
    """The embedded teacher's greedy accuracy, as the runs that load it measured it at their start.
    Every arm's *retained* is over this one number: OPSD's and ATESD's own teacher is the student
    reading a privileged context, whose accuracy without it is the student's."""
    embedded = {name for name in {r["name"] for r in results} if teacher_of(name) == "embedded:teacher"}  # each arm's configs read once
    values = [r["teacher"]["greedy/all"] for r in results if r["teacher"] and r["name"] in embedded]
    return statistics.fmean(values) if values else None


def overview_table(results: list[dict[str, object]], arms: list[str], teacher: float | None) -> str:
    """One row per arm that ran: its kind, seeds, end greedy accuracy, forgetting, the share of the
    embedded teacher's accuracy retained, student rollout tokens and minutes per run (mean ± sample
    standard deviation over seeds; ``teacher`` is that accuracy), after a row for the student at
    the start and the teacher."""
    rows = [
        "| arm | kind | seeds | all greedy | forgotten | retained | student rollout tokens | minutes per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if results:
        rows.append(f"| student at the start | | | {results[0]['start']['greedy/all']:.3f} | | | | |")
    if teacher:
        rows.append(f"| teacher (embedded) | | | {teacher:.3f} | | | | |")
    for arm in arms:
        runs = [r for r in results if r["name"] == arm]
        if not runs:
            continue
        tokens = [r["student_tokens"] for r in runs]
        retained = [r["end"]["greedy/all"] / teacher for r in runs] if teacher else []
        rows.append(
            f"| {arm} | {KINDS.get(arm, '')} | {len(runs)} | {mean_sd([r['end']['greedy/all'] for r in runs])} "
            f"| {mean_sd([r['end']['forgotten/all'] for r in runs])} | {mean_sd(retained)} "
            f"| {statistics.fmean(tokens):,.0f} | {statistics.fmean(r['minutes'] for r in runs):.1f} |"
        )
    return "\n".join(rows)


def claim_values(results: list[dict[str, object]], alignment: list[dict[str, object]], arms: list[str]) -> dict[str, list[float]]:
    """What the claims compare: each arm's end greedy accuracy per seed, and each alignment signal
    and split's mean alignment per seed. Only arms with at least one run: a claim on an arm not yet
    run is "not run", never a test of nothing."""
    accuracy = {arm: [r["end"]["greedy/all"] for r in results if r["name"] == arm] for arm in arms}
    return {arm: v for arm, v in accuracy.items() if v} | alignment_values(alignment)


def page(results: list[dict[str, object]], alignment: list[dict[str, object]], arms: list[str], seeds: list[int],
         command: str, alpha: float, budget: int) -> str:
    minutes = sum(r["minutes"] for r in [*results, *alignment])  # a replication made over several calls: all its runs
    values = claim_values(results, alignment, arms)
    teacher = reference_teacher(results)
    claims = ["| claim | arm | verdict | evidence (difference of means, permutation p) |", "|---|---|---|---|"]
    for claim in [*CLAIMS, *ALIGNMENT_CLAIMS]:
        held, evidence = verdict(claim, values, alpha)
        claims.append(f"| {claim.text} | {claim.arm} | {held} | {evidence} |")
    planned = len(arms) * len(seeds) + len(seeds)
    return "\n".join([
        "# Results on the embedded default",
        "",
        (f"Made by `{command}` on this machine (2 CPU cores, no GPU): {len(results) + len(alignment)} of its {planned} runs "
         f"({len(arms)} arms and the alignment diagnostic, seeds {seeds}), {minutes:.1f} minutes of runs in all. Every arm "
         f"trains from the shipped embedded student with a budget of {budget:,} student rollout tokens (each config's "
         "`trainer.max_steps` the upper bound: arms that sample nothing from the student, SFT and KD, end there)."),
        "",
        "## Overview",
        "",
        overview_table(results, arms, teacher),
        "",
        "## Accuracy per arm and skill",
        "",
        ("Validation split (174 problems) at the end of each run; cells are mean ± sample standard deviation over seeds. "
         "*forgotten*: of the problems the student solved greedily at the start, the share it fails at the end; "
         "*retained*: the student's greedy accuracy over the embedded teacher's; *minutes*: one run's wall time, start and end "
         "evaluations included."),
        "",
        seed_table(results, (), teacher),
        "",
        f"## The papers' claims (one-sided exact permutation test over seeds, held at p <= {alpha})",
        "",
        ("*held*: the arm's values are above every compared arm's at p <= alpha; *not held*: a compared arm is above it "
         "at that level; *inconclusive*: neither. With three seeds p = 0.05 is the smallest value the test can give: "
         "all three of one arm above all three of the other."),
        "",
        *claims,
        "",
        "## Gradient alignment on correct and incorrect rollouts",
        "",
        (f"`lit-zpd diagnose --config configs/diagnose/embedded.yaml {' '.join(ALIGNMENT_ARGS)} --seed=<seed>`: "
         "logit-space cosine between each signal's distillation direction and the ideal gradient of the student's "
         "success, mean over questions, then mean ± sample standard deviation over seeds; A_T is the teacher "
         "advantage (docs/alignment.md)."),
        "",
        alignment_table(alignment) if alignment else "not run",
        "",
        "## Plots",
        "",
        "![accuracy against student rollout tokens](accuracy_vs_tokens.png)",
        "",
        "![accuracy per skill at the end of every arm](accuracy_by_skill.png)",
        "",
        "Where each method's step time goes (sampling, forward passes, loss, optimizer): "
        "[BENCHMARKS.md](BENCHMARKS.md#where-a-steps-time-goes).",
        "",
    ])


def kept(path: Path, settings: list[str], make: Callable[[], dict[str, object]] | None) -> dict[str, object] | None:
    """The result kept at ``path`` when it was made with the same ``settings``, else ``make()``
    (then kept there), or ``None`` without ``make``."""
    if path.is_file():
        held = json.loads(path.read_text())
        if held.get("overrides") == settings:
            print(f"replicate: {path.stem} taken from {path}", file=sys.stderr)
            return held["result"]
    if make is None:
        return None
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overrides": settings, "result": result}, indent=1))
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
    parser.add_argument("--no_alignment", action="store_true", help="leave out the gradient alignment diagnostic")
    parser.add_argument("--page_only", action="store_true", help="rewrite the page and plots from the kept results, running nothing")
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
    diagnose_args = QUICK_ALIGNMENT_ARGS if args.quick else ALIGNMENT_ARGS
    folder = args.out / "replication"
    if args.fresh:
        for path in folder.glob("*-seed*.json"):
            path.unlink()
    # The command that made the runs: --page_only only rewrites their page.
    command = "python scripts/replicate.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--page_only")
    path = args.out / "RESULTS.md"
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    alignment: list[dict[str, object]] = []

    def write_page() -> None:
        # After every run: a replication stopped part way shows what it has.
        plots(results, arms, args.out)
        path.write_text(page(results, alignment, arms, seeds, command.strip(), args.alpha, args.budget))

    # The diagnostic first (minutes), then arm by arm over every seed, so that a replication
    # stopped part way has decided the claims on the arms it reached.
    for seed in [] if args.no_alignment else seeds:
        out_dir = args.logs / "diagnose" / f"seed{seed}"
        made = None if args.page_only else partial(alignment_run, diagnose_args, seed, out_dir)
        alignment += filter(None, [kept(folder / f"alignment-seed{seed}.json", diagnose_args, made)])
        if made:
            write_page()
    for arm in arms:
        for seed in seeds:
            made = None if args.page_only else partial(run, arm, overrides, seed)
            results += filter(None, [kept(folder / f"{arm.replace('/', '__')}-seed{seed}.json", overrides, made)])
            if made:
                write_page()
    write_page()
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
