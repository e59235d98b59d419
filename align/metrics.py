"""Metrics on disk: every logged dict as a JSON line, and a PNG of the training curves."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from transformers import TrainerCallback

from align.io import atomic_write_text


class JsonlMetricsCallback(TrainerCallback):
    """Appends each ``Trainer`` log (with ``step`` and ``epoch``) to a JSONL file on the main process. A resumed run
    first cuts the file back to its checkpoint's step (:func:`truncate_after`), so the steps between that checkpoint
    and the interruption are not logged twice."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0:  # resumed from a checkpoint of that step
            truncate_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def truncate_after(path: str, step: int) -> None:
    """Drop the records at the end of JSONL file ``path`` logged after ``step`` (atomically). Only the trailing ones:
    the iterative driver logs every round into one file, each round counting its steps from 1."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    keep = len(lines)
    while keep and _step(lines[keep - 1]) > step:
        keep -= 1
    if keep < len(lines):
        atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in lines[:keep]))


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut short by a kill
        return math.inf


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(records: list[dict], path: str, keys: list[str] | None = None, title: str = "") -> list[str]:
    """Plot each numeric metric against ``step`` in its own panel; returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        for k, v in r.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            series[k].append((r["step"], v))
    keys = [k for k in (keys or sorted(series)) if len(series.get(k, ())) >= 2]
    if not keys:
        return []
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        xs, ys = zip(*series[k], strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return keys
