"""Accuracy summaries: per-skill greedy accuracy and mean accuracy over k samples."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """Fold evaluation batches into ``{"greedy/<skill>": acc, "mean_at_k/<skill>": acc, ...}``.

    ``<skill>`` includes ``all``. ``partial_fraction`` is the share of problems whose sampled pass
    rate lies strictly between 0 and 1.
    """
    greedy: dict[str, list[float]] = defaultdict(list)
    sampled: dict[str, list[float]] = defaultdict(list)
    for batch in results:
        for i, skill in enumerate(batch["skills"]):
            for key in (skill, "all"):
                greedy[key].append(float(batch["greedy_correct"][i]))
                if "sample_pass_rate" in batch:
                    sampled[key].append(float(batch["sample_pass_rate"][i]))
    out = {f"greedy/{k}": sum(v) / len(v) for k, v in greedy.items()}
    out |= {f"mean_at_k/{k}": sum(v) / len(v) for k, v in sampled.items()}
    if sampled["all"]:
        out["partial_fraction"] = sum(0 < p < 1 for p in sampled["all"]) / len(sampled["all"])
    # Group rows by metric, skills in the order met, the overall value last.
    return dict(sorted(out.items(), key=lambda kv: (kv[0].split("/")[0], kv[0].endswith("/all"))))


def accuracy_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per model or moment."""
    keys = list(dict.fromkeys(k for summary in columns.values() for k in summary))
    width = max([len(k) for k in keys] + [6])
    header = f"{'metric':<{width}}  " + "  ".join(f"{name:>16}" for name in columns)
    lines = [header, "-" * len(header)]
    for key in keys:
        cells = "  ".join(f"{c[key]:>16.3f}" if key in c else f"{'-':>16}" for c in columns.values())
        lines.append(f"{key:<{width}}  {cells}")
    return "\n".join(lines)
