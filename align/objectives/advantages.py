"""Advantages over ragged groups, keyed by group id (never by reshaping to a fixed group size).

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) and its variants as TRL names them
(``scale_rewards``; docs/methods.md §11): Â_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4), the same Â_i for
every token of completion i. Dr.GRPO (Liu et al. 2025, arXiv:2503.20783) drops the division. RAFT /
RAFT++ (Dong et al. 2023; Xiong et al. 2025) use 1 for accepted (verified-correct) samples, 0 otherwise.

The estimators a config names (``advantage``) are registered in :data:`ESTIMATORS`:
``fn(rewards, group_ids, *, hyper=default) -> [N] tensor``; bind one with
``ESTIMATORS.bind(name, scale_rewards=..., accept_threshold=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.registry import Registry

ESTIMATORS = Registry("advantage")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4


def group_advantages(rewards, group_ids: Sequence[int] | torch.Tensor, scale: str = "group") -> torch.Tensor:
    """Group-centred advantages for ragged groups.

    ``rewards[i]`` belongs to group ``group_ids[i]``; groups may have any size and need not be
    contiguous. Every reward is centred by its group's mean; ``scale="group"`` then divides by the
    group's unbiased std + 1e-4, ``"batch"`` by the unbiased std of all rewards + 1e-4, ``"none"``
    (Dr.GRPO) by nothing.

    A group of size 1 has no baseline and no spread: it is centred by 0 and scaled by 1 (under
    ``"group"``), so its advantage is its raw reward, as GVM's verl code does (docs/methods.md §13.4). Under
    ``"batch"`` it is divided by the batch std like every other sample.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: must be one of {SCALES}, got {scale!r}")
    r = torch.as_tensor(rewards, dtype=torch.float32)
    ids = torch.as_tensor(group_ids)
    if r.ndim != 1 or ids.shape != r.shape:
        raise ValueError(f"rewards and group_ids must be 1-D of one length, got {tuple(r.shape)} and "
                         f"{tuple(ids.shape)}")
    if r.numel() == 0:
        return r.clone()
    _, inverse = torch.unique(ids, return_inverse=True)
    groups = int(inverse.max()) + 1
    count = torch.zeros(groups).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(groups).index_add_(0, inverse, r) / count
    sq = torch.zeros(groups).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count[inverse] == 1
    centred = torch.where(single, r, r - mean[inverse])
    if scale == "group":
        return torch.where(single, r, centred / (std[inverse] + STD_EPS))
    if scale == "batch":
        batch_std = r.std() if r.numel() > 1 else torch.tensor(0.0)
        return centred / (batch_std + STD_EPS)
    return centred


def raft_advantages(rewards, threshold: float = 0.5) -> torch.Tensor:
    """RAFT / RAFT++: 1.0 where the reward exceeds ``threshold`` (the sample is accepted), else 0.0.

    GVM's code uses max(reward, 0) on a 1/0 verifier reward; with a weighted sum of several rewards an
    explicit acceptance threshold keeps the advantage binary (docs/methods.md §13.4). Default 0.5, the same
    acceptance rule as GVM's p_i (score > 0.5).
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return (r > threshold).float()


@ESTIMATORS.register("grpo", "group-centred, divided by the std that scale_rewards names (none: Dr.GRPO)")
def grpo(rewards, group_ids, *, scale_rewards: str = "group") -> torch.Tensor:
    return group_advantages(rewards, group_ids, scale_rewards)


@ESTIMATORS.register("raft", "1 where the reward exceeds accept_threshold (accepted), else 0 (RAFT / RAFT++)")
def raft(rewards, group_ids, *, accept_threshold: float = 0.5) -> torch.Tensor:
    return raft_advantages(rewards, accept_threshold)


ADVANTAGES = ESTIMATORS.names()
