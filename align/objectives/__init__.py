"""Preference objectives: small pure functions over log-prob tensors, registered by name.

    from align.objectives import build
    loss_fn = build("hdpo", beta=0.1, alpha=0.9)
    out = loss_fn(batch)   # out.losses: [B]; out.metrics: dict of scalars

RL pieces, each a registry chosen by a config name: advantage estimators ``ESTIMATORS`` (``advantage``:
grpo, raft; over ragged groups), token losses ``TOKEN_LOSSES`` (``policy_loss``: GRPO clip, RAFT nll) and
``AGGREGATIONS`` (``loss_type``: grpo, bnpo, dapo, dr_grpo), put together by ``policy_loss`` with the k3 KL.
"""

from align.objectives.advantages import ESTIMATORS, group_advantages, raft_advantages
from align.objectives.base import ObjectiveOutput, ObjectiveSpec, build, check_params, register, registry
from align.objectives.policy import AGGREGATIONS, TOKEN_LOSSES, aggregate, k3_kl, policy_loss

__all__ = [
    "AGGREGATIONS", "ESTIMATORS", "ObjectiveOutput", "ObjectiveSpec", "TOKEN_LOSSES", "aggregate", "build",
    "check_params", "group_advantages", "k3_kl", "policy_loss", "raft_advantages", "register", "registry",
]
