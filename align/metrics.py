"""Metrics on disk: every logged dict as a JSON line (the plots drawn from them: :mod:`align.plots`)."""

from __future__ import annotations

import json
import math
import os

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

