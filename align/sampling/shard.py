"""Placing ragged groups on processes: each group stays whole on one process, work stays balanced."""

from __future__ import annotations

from collections.abc import Sequence


def assign_groups(costs: Sequence[float], world: int) -> list[int]:
    """The process of each group: longest-processing-time-first, so the largest per-process total is
    within one group of the smallest. Deterministic (ties go to the lower group and process index), so
    every process computes the same placement without talking to the others."""
    if world < 1:
        raise ValueError(f"world: must be >= 1, got {world}")
    load = [0.0] * world
    owner = [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[g] = rank
        load[rank] += costs[g]
    return owner
