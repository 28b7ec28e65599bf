"""Pictures for TensorBoard: what a person reads at a glance instead of a wall of scalars.

:func:`mastery_map` draws IOA's curriculum (:class:`~lit_zpd.callbacks.curriculum.CurriculumScheduler`)
as a heat map: one row per (skill, level) cell in curriculum order, one column per probe, the
colour the mastery ratio ``P_S / P_T``, the frontier (cells being taught) outlined in black and
the mastery bar marked on the colour scale. matplotlib draws off-screen (the Agg backend).
"""

from __future__ import annotations

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
