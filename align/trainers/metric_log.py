"""Step metrics shared by our trainers: recorded per step (already averaged over processes), averaged
over the logging window in ``log``."""

from __future__ import annotations

from collections import defaultdict

import torch


class MetricsMixin:
    """Mix into a ``transformers.Trainer`` subclass before ``Trainer``."""

    def _init_metrics(self) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Record per-process scalar tensors as their mean over processes (a collective: every process
        must call it with the same keys)."""
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).to(self.args.device)
        values = self.accelerator.gather(values[None]).mean(0)
        for k, v in zip(keys, values.tolist(), strict=True):
            self._metrics[mode][k].append(v)

    def record_global(self, mode: str, metrics: dict[str, float]) -> None:
        """Record values that are already the same on every process (no communication); averaged into the next
        log (a monitor's check, a round's statistics)."""
        for k, v in metrics.items():
            self._metrics[mode][k].append(float(v))

    def log_now(self, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at once, as their own record at the current step (metrics.jsonl and the trackers), not
        averaged into the next logging window: e.g. a monitor's check before the first step (step 0)."""
        pending, self._metrics["train"] = self._metrics["train"], defaultdict(list)
        try:
            self.log({k: float(v) for k, v in metrics.items()})
        finally:
            self._metrics["train"] = pending

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, vals in self._metrics[mode].items():
            if vals:
                logs[prefix + k] = sum(vals) / len(vals)
        self._metrics[mode].clear()
        super().log(logs, start_time)
