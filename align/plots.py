"""A run's plots as PNGs under ``<output_dir>/plots/``: written at the end of every run (:func:`write_plots`, called
by :func:`align.recipe.finish_run`) and by ``align plot OUTPUT_DIR`` for a run in progress or finished.

What each figure shows, and the numbers behind it, come from :func:`align.plot_data.figures`; this module only
draws them: one panel per quantity, two panels a row, each :data:`PANEL_SIZE` inches at :data:`DPI` dots per inch.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from align.errors import ConfigError
from align.io import atomic_open
from align.plot_data import Figure, Panel, figures, metrics_path, number

FOLDER = "plots"
PANEL_SIZE = (6.4, 4.2)  # inches per panel
MARGINS = (0.95, 0.25, 0.45, 0.6)  # inches of a panel's cell around its axes: left, right, top, bottom
TITLE_HEIGHT = 0.5  # inches above the panels for the figure's title
DPI = 100
COLUMNS = 2
LINE_STYLES = ("-", "--", ":", "-.")
BOX_ROUNDS = 40  # up to this many rounds a box per round; more: percentile bands
# Every file write_plots may write: the ones a run's data no longer supports are removed, so plots/ never keeps a
# figure of another run (overwrite_output_dir) next to this one's.
NAMES = ("curves.png", "preference.png", "policy.png", "entanglement.png", "allocation.png",
         "allocation_last_round.png", "iterations.png")


def figure_pixels(panels: int, columns: int = COLUMNS) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``panels`` panels."""
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    return round(PANEL_SIZE[0] * cols * DPI), round((PANEL_SIZE[1] * rows + TITLE_HEIGHT) * DPI)


def write_plots(output_dir: str) -> list[str]:
    """Draw every figure the run in ``output_dir`` has data for into ``<output_dir>/plots/`` (atomically, each
    PNG replaced whole); remove the figures it has no data for; returns the paths written."""
    folder = os.path.join(output_dir, FOLDER)
    written = []
    for fig in figures(output_dir):
        path = os.path.join(folder, fig.name)
        draw(fig, path)
        written.append(path)
    for name in NAMES:
        stale = os.path.join(folder, name)
        if stale not in written and os.path.isfile(stale):
            os.remove(stale)
    return written


def plot_command(output_dir: str) -> list[str]:
    """``align plot OUTPUT_DIR``: :func:`write_plots`, for a folder that holds a run's metrics."""
    path = metrics_path(output_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"align plot: {output_dir!r} holds no {os.path.basename(path)} (not a run's output_dir, "
                          "or the run has logged nothing yet)")
    return write_plots(output_dir)


# --- drawing -------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def draw(fig: Figure, path: str, columns: int = COLUMNS) -> None:
    """Draw ``fig`` (:func:`figure_pixels` in size: each panel a fixed cell, so no layout pass) to the PNG ``path``."""
    plt = pyplot()
    width, height = (v / DPI for v in figure_pixels(len(fig.panels), columns))
    canvas = plt.figure(figsize=(width, height), dpi=DPI)
    left, right, top, bottom = MARGINS
    cols = min(columns, len(fig.panels))
    try:
        for i, panel in enumerate(fig.panels):
            x0 = (i % cols) * PANEL_SIZE[0]
            y0 = height - TITLE_HEIGHT - (i // cols + 1) * PANEL_SIZE[1]  # the cell's bottom, inches from below
            ax = canvas.add_axes(((x0 + left) / width, (y0 + bottom) / height,
                                  (PANEL_SIZE[0] - left - right) / width, (PANEL_SIZE[1] - top - bottom) / height))
            draw_panel(canvas, ax, panel)
        canvas.suptitle(fig.title, fontsize=13, y=1 - 0.1 / height, va="top")
        with atomic_open(path, "wb") as fh:
            canvas.savefig(fh, format="png", dpi=DPI)
    finally:
        plt.close(canvas)


def draw_panel(canvas, ax, panel: Panel) -> None:
    from matplotlib.ticker import MaxNLocator

    for i, (label, (xs, ys)) in enumerate(panel.lines.items()):
        if xs:  # a line style each, so that equal series stay visible; a lone point drawn larger
            ax.plot(xs, ys, label=label, linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.4,
                    marker="o" if len(xs) <= 50 else None, markersize=3 if len(xs) > 1 else 6)
    if panel.boxes:
        draw_distribution(ax, panel.boxes)
    if panel.scatter is not None:
        xs, ys, cs = panel.scatter
        dots = ax.scatter(xs, ys, c=cs, cmap="viridis", s=36, edgecolors="black", linewidths=0.4)
        canvas.colorbar(dots, ax=ax, label=panel.clabel)
    if panel.hline is not None:
        ax.axhline(panel.hline, color="grey", linestyle="--", linewidth=1)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.scatter is None:  # steps, rounds, iterations
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(panel.lines) > 1 or (panel.lines and panel.boxes):
        ax.legend(fontsize=8)


def draw_distribution(ax, boxes: dict[int, list[float]]) -> None:
    """One box per x (median, quartiles, 1.5 IQR whiskers, outliers) up to :data:`BOX_ROUNDS` of them; more: the
    median with 25-75 and 5-95 percentile bands."""
    import numpy as np

    xs = sorted(boxes)
    if len(xs) <= BOX_ROUNDS:
        ax.boxplot([boxes[x] for x in xs], positions=xs, widths=0.6, manage_ticks=False)
        return
    bands = {q: [float(np.percentile(boxes[x], q)) for x in xs] for q in (5, 25, 50, 75, 95)}
    ax.fill_between(xs, bands[5], bands[95], alpha=0.2, label="5-95th percentile")
    ax.fill_between(xs, bands[25], bands[75], alpha=0.4, label="25-75th percentile")
    ax.plot(xs, bands[50], label="median")
    ax.legend(fontsize=8)


# --- any metrics, one panel each (the quickstart's training_curves.png) ---------------------------


def plot_metrics(records: list[dict], path: str, keys: list[str] | None = None, title: str = "") -> list[str]:
    """Plot each numeric metric of ``records`` against ``step`` in its own panel (three a row); returns the keys
    plotted (those with at least two points)."""
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        for k, v in r.items():
            if k not in ("step", "epoch") and number(v) and number(r.get("step")):
                series[k][0].append(r["step"])
                series[k][1].append(v)
    keys = [k for k in (keys or sorted(series)) if k in series and len(series[k][0]) >= 2]
    if keys:
        draw(Figure(os.path.basename(path), title, [Panel(k, k, "step", lines={k: series[k]}) for k in keys]),
             path, columns=3)
    return keys

