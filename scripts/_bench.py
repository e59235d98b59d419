"""Shared pieces of the benchmark scripts: each (tool, setting) in its own child process of one job, the
fastest of the repeats kept, and a step timer."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def step_timer():
    """A ``TrainerCallback`` recording the wall time at each step's end and any logged ``reward``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.rewards: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    return StepTimer()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_children(script: str, settings, repeats: int, child_args: list[str], better,
                 tools=("trl", "align")) -> dict[tuple[str, str], dict]:
    """Runs ``script --child TOOL SETTING *child_args`` for each of ``tools`` in order, ``repeats`` times each, and
    keeps per (tool, setting) the result that ``better(new, old)`` prefers. A child prints ``RESULT <json>``."""
    results: dict[tuple[str, str], dict] = {}
    for setting in settings:
        for tool in tools:
            for _ in range(repeats):
                proc = subprocess.run([sys.executable, script, "--child", tool, setting, *child_args],
                                      capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{tool}/{setting} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[0][7:])
                old = results.get((tool, setting))
                if old is None or better(r, old):
                    results[(tool, setting)] = r
    return results
