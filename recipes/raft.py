"""RAFT / RAFT++ (reward-ranked fine-tuning on accepted samples), optionally with GVM allocation.

    align train raft --config configs/raft/testbed.yaml                       # RAFT++ (clipped surrogate)
    align train raft --config configs/raft/testbed.yaml policy_loss=nll       # plain RAFT
    align train raft --config configs/raft/testbed.yaml allocator=gvm         # GVM-RAFT++

Advantage 1 for a rollout whose reward exceeds ``accept_threshold`` (verified correct), 0 otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.recipe import Recipe, main
from align.recipes.grpo import GRPORecipeConfig, run


@dataclass
class RAFTRecipeConfig(GRPORecipeConfig):
    recipe_name = "raft"
    advantage: str = field(default="raft", metadata={"help": "Advantage estimator: raft (1 if accepted, else 0)."})
    policy_loss: str = field(default="clip", metadata={"help": "clip (RAFT++) or nll (plain RAFT)."})


RECIPE = Recipe("raft", "RAFT / RAFT++ on verified-correct samples (allocator: uniform, gvm, dynamic).",
                RAFTRecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
