"""Pictures for TensorBoard and reports: what a person reads at a glance instead of a wall of
scalars.

:func:`alignment_by_depth` and :func:`token_alignment` draw the gradient alignment diagnostic
(:mod:`lit_zpd.diagnostics.alignment`): by node depth for correct and incorrect rollouts, and one
rollout's tokens coloured by their node's alignment. :func:`mastery_map` draws IOA's curriculum (:class:`~lit_zpd.callbacks.curriculum.CurriculumScheduler`)
as a heat map: one row per (skill, level) cell in curriculum order, one column per probe, the
colour the mastery ratio ``P_S / P_T``, the frontier (cells being taught) outlined in black and
the mastery bar marked on the colour scale. :func:`accuracy_by_skill` draws the accuracy report
(:class:`~lit_zpd.callbacks.report.AccuracyReport`): per skill, the greedy accuracy of each model
and moment side by side. For many runs at once (``scripts/replicate.py``), :func:`skill_grid`
draws one row per arm and one column per skill, and :func:`accuracy_curves` draws accuracy against
the student's rollout tokens with a band over seeds. matplotlib draws off-screen (the Agg backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # off-screen: training machines have no display
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def mastery_map(history: Sequence[dict[str, Any]], cells: Sequence[tuple[str, int]], mastery_ratio: float = 0.9) -> Figure:
    """The heat map of ``P_S / P_T`` per cell over the probes.

    Args:
        history: One entry per probe with ``step``, ``ratios`` (``[skill, level, ratio]`` rows)
            and ``frontier`` (``[skill, level]`` rows).
        cells: The rows, in curriculum order.
        mastery_ratio: Drawn as a line on the colour bar.
    """
    row = {tuple(cell): i for i, cell in enumerate(cells)}
    grid = [[float("nan")] * len(history) for _ in cells]
    for col, probe in enumerate(history):
        for skill, level, ratio in probe["ratios"]:
            if (skill, level) in row:
                grid[row[(skill, level)]][col] = min(ratio, 1.2)
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * max(len(history), 4), 0.9 + 0.32 * len(cells)), dpi=100)
    image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0.0, vmax=1.2, interpolation="nearest")
    for col, probe in enumerate(history):
        for skill, level in probe["frontier"]:
            if (skill, level) in row:
                ax.add_patch(Rectangle((col - 0.5, row[(skill, level)] - 0.5), 1, 1, fill=False, lw=2.0, ec="black"))
    ax.set_yticks(range(len(cells)), [f"{skill} L{level}" for skill, level in cells], fontsize=8)
    ax.set_xticks(range(len(history)), [str(probe["step"]) for probe in history], fontsize=8)
    ax.set_xlabel("optimizer step of the probe (frontier outlined)")
    ax.set_title("mastery P_S / P_T per skill and level", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05)
    bar.ax.axhline(mastery_ratio, color="black", lw=1.5)
    fig.tight_layout()
    return fig


def alignment_by_depth(by_depth: dict[str, dict[str, dict[int, float]]]) -> Figure:
    """Mean gradient alignment against node depth, one colour per signal, solid for correct and
    dashed for incorrect rollouts (``AlignmentReport.by_depth``)."""
    fig, ax = plt.subplots(figsize=(8.4, 3.8), dpi=100)
    for i, (name, splits) in enumerate(by_depth.items()):
        colour = f"C{i}"
        for split, style in (("correct", "-"), ("incorrect", "--")):
            depths = sorted(splits.get(split, {}))
            if depths:
                ax.plot([d + 1 for d in depths], [splits[split][d] for d in depths], style, marker="o", ms=3,
                        color=colour, label=f"{name}, {split}")
    ax.set_xscale("log", base=2)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("node depth + 1, buckets 0, 1, 2-3, 4-7, ... (response tokens before the node)")
    ax.set_ylabel("cosine(ideal, distillation)")
    ax.set_title("gradient alignment by depth", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def accuracy_by_skill(columns: dict[str, dict[str, float]]) -> Figure:
    """Greedy accuracy per skill (``all`` last), one bar per column: grouped bars of, say, the
    student at the start, the teacher at the start and the student at the end.

    Args:
        columns: ``{column name: summary}``, the summaries of :func:`lit_zpd.report.summarize`
            (their ``greedy/<skill>`` keys are drawn); a skill a column lacks has no bar there.
    """
    skills = dict.fromkeys(k.removeprefix("greedy/") for c in columns.values() for k in c if k.startswith("greedy/"))
    skills = sorted(skills, key=lambda skill: skill == "all")  # in the order met, ``all`` last
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(2.0 + 0.3 * len(skills) * max(len(columns), 2), 3.8), dpi=100)
    for i, (name, summary) in enumerate(columns.items()):
        drawn = [(x, summary[f"greedy/{skill}"]) for x, skill in enumerate(skills) if f"greedy/{skill}" in summary]
        ax.bar([x + (i - (len(columns) - 1) / 2) * width for x, _ in drawn], [v for _, v in drawn], width,
               color=f"C{i}", label=name)
    ax.set_xticks(range(len(skills)), skills, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("greedy accuracy")
    ax.set_title("greedy accuracy per skill", fontsize=10)
    if columns:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def token_alignment(tokens: Sequence[str], scores: Sequence[float], title: str) -> Figure:
    """One rollout's tokens in order, each on a background coloured by its node's alignment
    (red -1, white 0, green +1; grey where it was not measured)."""
    per_row = 24
    rows = max(1, -(-len(tokens) // per_row))
    fig, ax = plt.subplots(figsize=(0.36 * per_row + 1.0, 0.5 * rows + 0.9), dpi=100)
    cmap = plt.get_cmap("RdYlGn")
    for i, (token, score) in enumerate(zip(tokens, scores)):
        x, y = i % per_row, rows - 1 - i // per_row
        colour = "lightgrey" if math.isnan(score) else cmap((score + 1) / 2)  # not measured
        ax.add_patch(Rectangle((x, y), 0.95, 0.9, color=colour))
        label = {"\n": "\\n", " ": "␣"}.get(token, token)
        ax.text(x + 0.47, y + 0.45, label, ha="center", va="center", fontsize=8, family="monospace")
    ax.set_xlim(0, per_row)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(-1, 1)), ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def skill_grid(start: dict[str, float], end: dict[str, dict[str, float]], title: str = "") -> Figure:
    """Greedy accuracy per skill of many arms at once: one row per arm (the start first), one
    column per skill (``all`` last), each cell coloured by the accuracy and labelled with it and,
    for the arms, its change from the start (green up, red down).

    Args:
        start: The summary every arm starts from (its ``greedy/<skill>`` keys are drawn).
        end: ``{arm: summary at the end}``, in the order the rows are drawn.
        title: Above the grid.
    """
    skills = sorted((k.removeprefix("greedy/") for k in start if k.startswith("greedy/")), key=lambda skill: skill == "all")
    rows = {"start": start, **end}
    fig, ax = plt.subplots(figsize=(1.2 + 1.05 * len(skills) + 2.6, 0.9 + 0.3 * len(rows)), dpi=100)
    cmap = plt.get_cmap("viridis")
    for y, (name, summary) in enumerate(rows.items()):
        for x, skill in enumerate(skills):
            value = summary.get(f"greedy/{skill}", math.nan)
            ax.add_patch(Rectangle((x, y), 1.0, 1.0, color="lightgrey" if math.isnan(value) else cmap(value)))
            if math.isnan(value):
                continue
            ink = "black" if value > 0.55 else "white"
            ax.text(x + 0.3, y + 0.5, f"{value:.2f}", ha="center", va="center", fontsize=7, color=ink)
            if name != "start":
                delta = round(value - start[f"greedy/{skill}"], 2) + 0.0  # no "-0.00"
                shade = "#0a7a0a" if delta > 0.005 else "#b00000" if delta < -0.005 else ink
                ax.text(x + 0.75, y + 0.5, f"{delta:+.2f}", ha="center", va="center", fontsize=6, color=shade,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.axhline(1.0, color="white", lw=2)  # the start row apart from the arms
    ax.set_xlim(0, len(skills))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([x + 0.5 for x in range(len(skills))], skills, fontsize=8)
    ax.set_yticks([y + 0.5 for y in range(len(rows))], list(rows), fontsize=7)
    ax.tick_params(length=0)
    colour_bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0.0, 1.0)), ax=ax, fraction=0.04)
    colour_bar.set_label("greedy accuracy", fontsize=8)
    ax.set_title(title or "greedy accuracy per skill: end (change from the start)", fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_curves(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
                    xlabel: str = "student rollout tokens") -> Figure:
    """Accuracy curves side by side, one panel per group of arms.

    Args:
        panels: ``{panel title: {arm: (tokens, mean, standard deviation)}}``, each curve's points in
            order; a band of one standard deviation is drawn around the mean. An arm whose tokens
            are all 0 (it samples nothing from the student) is drawn as a dotted horizontal line at
            its last mean, with its band, so that it compares with the others at every budget.
        xlabel: The horizontal axis.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), dpi=100, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        ends = [t[-1] for t, _, _ in curves.values() if len(t)]
        right = max(ends, default=1.0) or 1.0
        for i, (arm, (tokens, mean, sd)) in enumerate(curves.items()):
            if not len(tokens):
                continue
            colour, style = f"C{i % 10}", "-" if i < 10 else "--"
            if max(tokens) == 0:
                ax.hlines(mean[-1], 0, right, colors=colour, linestyles=":", label=f"{arm} (no student tokens)")
                ax.fill_between([0, right], mean[-1] - sd[-1], mean[-1] + sd[-1], color=colour, alpha=0.08)
                continue
            ax.plot(tokens, mean, style, marker="o", ms=2.5, color=colour, label=arm)
            ax.fill_between(tokens, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=colour, alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation greedy accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig
