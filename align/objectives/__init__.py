"""Preference objectives: small pure functions over log-prob tensors, registered by name.

    from align.objectives import build
    loss_fn = build("hdpo", beta=0.1, alpha=0.9)
    out = loss_fn(batch)   # out.losses: [B]; out.metrics: dict of scalars

RL pieces: ``group_advantages`` / ``raft_advantages`` (ragged groups) and ``policy_loss`` (GRPO clip,
RAFT nll, k3 KL, the grpo/bnpo/dapo/dr_grpo aggregations).
"""

from align.objectives.advantages import group_advantages, raft_advantages
from align.objectives.base import ObjectiveOutput, ObjectiveSpec, build, check_params, register, registry
from align.objectives.policy import aggregate, k3_kl, policy_loss

__all__ = [
    "ObjectiveOutput", "ObjectiveSpec", "aggregate", "build", "check_params", "group_advantages", "k3_kl",
    "policy_loss", "raft_advantages", "register", "registry",
]
