"""Preference objectives: small pure functions over log-prob tensors, registered by name.

    from align.objectives import build
    loss_fn = build("hdpo", beta=0.1, alpha=0.9)
    out = loss_fn(batch)   # out.losses: [B]; out.metrics: dict of scalars
"""

from align.objectives.base import ObjectiveOutput, ObjectiveSpec, build, check_params, register, registry

__all__ = ["ObjectiveOutput", "ObjectiveSpec", "build", "check_params", "register", "registry"]
