"""XPO: online DPO on (policy sample, reference sample) pairs plus the exploration term α·S_θ(ỹ) (docs/methods.md §5).

    align train xpo --config configs/xpo/testbed.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/xpo.py --config configs/xpo/<real>.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from align.recipe import Recipe, main
from align.recipes.online_dpo import OnlineRecipeConfig, run


@dataclass
class XPORecipeConfig(OnlineRecipeConfig):
    recipe_name = "xpo"
    method = "xpo"


RECIPE = Recipe("xpo", "XPO: online DPO with a policy and a reference sample, plus alpha * S(reference sample).",
                XPORecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
