"""When a rollout engine gets the policy's weights: one rule for every trainer that generates.

An engine that holds its own copy of the weights (vLLM, colocated or server) is brought up to the policy
before the first generation, then before a generation once ``vllm_sync_steps`` optimizer steps have passed
since the last push. With the server engine only the main process pushes (``push_weights``), and every
process waits for it (a barrier) before generating. The HF engine generates with the live model: it is only
pointed at it, nothing is copied.
"""

from __future__ import annotations

import time

from align import progress


class WeightSync:
    """``sync(model, step)`` before each generation; returns the seconds spent pushing (0.0 when nothing was
    pushed). ``processes`` is the Accelerator or PartialState (``num_processes``, ``wait_for_everyone``); ``show``:
    a progress bar for each push on this process (:mod:`align.progress`)."""

    def __init__(self, engine, rollout: str, every: int, processes, show: bool = False):
        self.engine, self.rollout, self.every, self.processes = engine, rollout, every, processes
        self.show = show
        self.synced_step: int | None = None  # the step whose weights the engine holds (None: not pushed yet)

    def due(self, step: int) -> bool:
        return self.synced_step is None or step - self.synced_step >= self.every

    def __call__(self, model, step: int) -> float:
        if self.rollout == "hf":
            self.engine.sync_weights(model)  # the live model: nothing to copy
            return 0.0
        if not self.due(step):
            return 0.0
        start = time.perf_counter()
        with progress.bar(f"weight push to the {self.rollout} engine", 1, "push", show=self.show) as push:
            self.engine.sync_weights(model)
            if self.processes.num_processes > 1:
                self.processes.wait_for_everyone()
            push.finish()
        self.synced_step = step
        return time.perf_counter() - start
