"""Whether this run shards the weights or the optimizer state across processes: the one rule every config asks.

FSDP shards both; DeepSpeed ZeRO-1/2 shard the optimizer state (ZeRO-2 also gradients), ZeRO-3 the weights too;
ZeRO-0 shards nothing. Read from what ``accelerate launch`` puts in the environment and from the ``fsdp`` /
``deepspeed`` training arguments, before any process group or model exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Sharding:
    kind: str | None  # "FSDP", "ZeRO-<stage>", "DeepSpeed" (stage not given), or None (every process holds all)
    shards_weights: bool
    shards_optimizer: bool


def _on(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def sharding(args) -> Sharding:
    """How ``args`` (a config with ``fsdp`` and ``deepspeed`` keys) and the launcher's environment shard this run."""
    if _on("ACCELERATE_USE_FSDP") or args.fsdp:
        return Sharding("FSDP", True, True)
    ds = args.deepspeed
    if not (_on("ACCELERATE_USE_DEEPSPEED") or ds):
        return Sharding(None, False, False)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") if _on("ACCELERATE_USE_DEEPSPEED") else ""
    if isinstance(ds, str) and os.path.isfile(ds):
        with open(ds, encoding="utf-8") as fh:
            ds = json.load(fh)
    if isinstance(ds, dict):
        stage = str(ds.get("zero_optimization", {}).get("stage", stage))
    if not stage:
        return Sharding("DeepSpeed", False, True)  # stage unknown: assume the optimizer state is sharded
    return Sharding(f"ZeRO-{stage}", stage == "3", stage != "0")
