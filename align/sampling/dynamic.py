"""DAPO dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv:2503.14476).

In GRPO-style training a group whose rewards are all equal (every sample correct, or every sample wrong) has
zero advantage everywhere and contributes no policy gradient, while still counting in the batch. DAPO
over-samples prompts and keeps only groups with 0 < #correct < G, i.e. groups whose rewards are not all
equal, generating more prompts until the batch holds the target number of such groups; the surplus is
dropped. These helpers are the pure parts of that loop: which groups to keep, and truncating to the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["EQUAL_TOL", "nonzero_variance_groups", "select_groups"]

EQUAL_TOL = 1e-12


def nonzero_variance_groups(rewards: Sequence[float], group_ids: Sequence[int]) -> list[int]:
    """Ids of the groups whose rewards are not all equal, in order of first appearance in ``group_ids``.

    ``rewards[i]`` belongs to group ``group_ids[i]``; groups need not be contiguous. Rewards count as equal when
    they differ by at most 1e-12 (max − min ≤ 1e-12). A group of size 1 has zero variance and is never kept.
    Raises ``ValueError`` on mismatched lengths or a NaN reward.
    """
    r = [float(x) for x in rewards]
    ids = list(group_ids)
    if len(r) != len(ids):
        raise ValueError(f"rewards and group_ids: lengths differ ({len(r)} vs {len(ids)})")
    lo: dict = {}
    hi: dict = {}
    for x, gid in zip(r, ids):
        if math.isnan(x):
            raise ValueError(f"rewards: NaN reward in group {gid!r}")
        if gid in lo:
            lo[gid] = min(lo[gid], x)
            hi[gid] = max(hi[gid], x)
        else:
            lo[gid] = hi[gid] = x
    return [gid for gid in lo if hi[gid] - lo[gid] > EQUAL_TOL]


def select_groups(kept_ids: Sequence[int], target: int) -> list[int]:
    """The first ``target`` of ``kept_ids`` (order kept); all of them if there are fewer."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target: must be a non-negative integer, got {target!r}")
    return list(kept_ids)[:target]
