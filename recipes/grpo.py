"""GRPO and its variants (DAPO, Dr.GRPO) on ragged groups; the allocator (uniform, gvm, dynamic) is a config key.

    align train grpo --config configs/grpo/testbed.yaml
    align train grpo --config configs/grpo/testbed.yaml allocator=gvm
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/grpo.py \
        --config configs/grpo/qwen2.5-math-1.5b-numina-gvm.yaml

Data: prompt rows (``prompt``, standard or conversational) with whatever columns the reward functions
read (``answer`` for ``accuracy``, ``solution`` for ``math_verify``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.args import RecipeArguments
from align.recipe import Recipe, main, start, train_and_save
from align.trainers.rl_args import RLConfig


@dataclass
class GRPORecipeConfig(RecipeArguments, RLConfig):
    recipe_name = "grpo"
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate (TRL's GRPO default)."})


def build_trainer(config):
    from align.data.prompts import load_prompt_data
    from align.modeling import load_policy_and_reference, lora_config
    from align.rewards.registry import RewardSet
    from align.trainers.rl import RLTrainer

    # 1. Rewards and data, all checked before a model is loaded.
    reward_set = RewardSet.from_config(config)
    tokenizer, train, evaluation = load_prompt_data(config, reward_set.check_columns)

    # 2. Policy, and a separate reference only when one is named and the KL term is on.
    model, ref_model = load_policy_and_reference(config, want_reference=bool(config.beta))
    return RLTrainer(model, config, train, evaluation, tokenizer, reward_set=reward_set, ref_model=ref_model,
                     peft_config=lora_config(config), callbacks=start(config))


def run(config) -> dict:
    trainer = build_trainer(config)
    return train_and_save(trainer, config, **{"rollouts/total": lambda: trainer.rollouts_total})


RECIPE = Recipe("grpo", "GRPO / DAPO / Dr.GRPO with ragged groups (allocator: uniform, gvm, dynamic).",
                GRPORecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
