"""Pictures for TensorBoard and reports: what a person reads at a glance instead of a wall of
scalars.

:func:`alignment_by_depth` and :func:`token_alignment` draw the gradient alignment diagnostic
(:mod:`lit_zpd.diagnostics.alignment`): by node depth for correct and incorrect rollouts, and one
rollout's tokens coloured by their node's alignment. :func:`mastery_map` draws IOA's curriculum (:class:`~lit_zpd.callbacks.curriculum.CurriculumScheduler`)
as a heat map: one row per (skill, level) cell in curriculum order, one column per probe, the
colour the mastery ratio ``P_S / P_T``, the frontier (cells being taught) outlined in black and
the mastery bar marked on the colour scale. :func:`accuracy_by_skill` draws the accuracy report
(:class:`~lit_zpd.callbacks.report.AccuracyReport`): per skill, the greedy accuracy of each model
and moment side by side. matplotlib draws off-screen (the Agg backend).
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
