"""Supervised fine-tuning (SFT) on prompt/completion, messages or text data, via TRL's SFTTrainer.

    align train sft --config configs/sft/testbed.yaml
    accelerate launch recipes/sft.py --config configs/sft/testbed.yaml max_steps=50

With prompt/completion rows the loss covers completion tokens only (TRL's default). The training itself is
:func:`align.trainers.sft.train_sft`, which the testbed's SFT warm-up (``align testbed build``) runs too.
"""

from __future__ import annotations

import sys

from align.recipe import Recipe, main, start
from align.trainers.sft import SFTArguments, train_sft

SFTRecipeConfig = SFTArguments  # the recipe's config is the library's


def run(config: SFTRecipeConfig) -> dict:
    return train_sft(config, callbacks=lambda: start(config))


RECIPE = Recipe("sft", "Supervised fine-tuning (TRL SFTTrainer) on prompt/completion or chat data.",
                SFTRecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
