"""Accuracy summaries: per-skill greedy accuracy and mean accuracy over k samples."""

from __future__ import annotations

from collections import defaultdict

from lit_zpd.rollout.batch import EvalBatch


def summarize(results: EvalBatch) -> dict[str, float]:
    """Fold evaluation results into ``{"greedy/<skill>": acc, "mean_at_k/<skill>": acc, ...}``.

    ``<skill>`` includes ``all``. ``partial_fraction`` is the share of problems whose sampled pass
    rate lies strictly between 0 and 1.
    """
    greedy: dict[str, list[float]] = defaultdict(list)
    sampled: dict[str, list[float]] = defaultdict(list)
    for i, skill in enumerate(results.skills):
        for key in (skill, "all"):
            greedy[key].append(float(results.greedy_correct[i]))
            if results.sample_pass_rate is not None:
                sampled[key].append(float(results.sample_pass_rate[i]))
    out = {f"greedy/{k}": sum(v) / len(v) for k, v in greedy.items()}
    out |= {f"mean_at_k/{k}": sum(v) / len(v) for k, v in sampled.items()}
    if sampled["all"]:
        out["partial_fraction"] = sum(0 < p < 1 for p in sampled["all"]) / len(sampled["all"])
    # Group rows by metric, skills in the order met, the overall value last.
    return dict(sorted(out.items(), key=lambda kv: (kv[0].split("/")[0], kv[0].endswith("/all"))))


def solved(results: EvalBatch) -> list[str]:
    """Problem ids solved greedily, sorted."""
    return sorted(pid for pid, ok in zip(results.problem_ids, results.greedy_correct) if ok)


def forgetting(solved_before: list[str], results: EvalBatch) -> dict[str, float]:
    """Share of the problems solved greedily before that the model now fails, per skill and overall.

    ``{"forgotten/<skill>": share, ..., "forgotten/all": share, "solved_before/all": count}``;
    skills without a problem solved before are left out (nothing there to forget).
    """
    before = set(solved_before)
    lost: dict[str, list[float]] = defaultdict(list)
    for pid, skill, ok in zip(results.problem_ids, results.skills, results.greedy_correct):
        if pid in before:
            for key in (skill, "all"):
                lost[key].append(0.0 if ok else 1.0)
    out = {f"forgotten/{k}": sum(v) / len(v) for k, v in lost.items() if k != "all"}
    out["forgotten/all"] = sum(lost["all"]) / len(lost["all"]) if lost["all"] else 0.0
    out["solved_before/all"] = float(len(lost["all"]))
    return out


def accuracy_table(columns: dict[str, dict[str, float]], markdown: bool = False) -> str:
    """A table with one row per metric and one column per model or moment: plain text for the
    console, or a markdown table (``markdown=True``) for TensorBoard's text tab. A cell a column
    lacks reads ``-``."""
    keys = list(dict.fromkeys(k for summary in columns.values() for k in summary))
    if markdown:
        lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(f"{c[key]:.3f}" if key in c else "-" for c in columns.values()) + " |")
        return "\n".join(lines)
    width = max([len(k) for k in keys] + [6])
    header = f"{'metric':<{width}}  " + "  ".join(f"{name:>16}" for name in columns)
    lines = [header, "-" * len(header)]
    for key in keys:
        cells = "  ".join(f"{c[key]:>16.3f}" if key in c else f"{'-':>16}" for c in columns.values())
        lines.append(f"{key:<{width}}  {cells}")
    return "\n".join(lines)
