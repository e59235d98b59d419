"""EGPO: extragradient steps on the online IPO loss (docs/methods.md §6); ``egpo_extragradient=false`` is online IPO.

    align train egpo --config configs/egpo/testbed.yaml [egpo_variant=oipo2] [mixture_coef=0.125]
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/egpo.py --config configs/egpo/<real>.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from align.args import option
from align.recipe import Recipe, main
from align.recipes.online_dpo import OnlineRecipeConfig, run


@dataclass
class EGPORecipeConfig(OnlineRecipeConfig):
    recipe_name = "egpo"
    method = "egpo"
    objective: str = option("online_ipo", "EGPO's loss: online_ipo (token-mean log-ratios, soft preference target).")


RECIPE = Recipe("egpo", "EGPO: extragradient online IPO for non-transitive preferences (Nash learning).",
                EGPORecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
