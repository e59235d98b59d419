"""Online DPO: two samples per prompt from the current policy, labelled by a preference oracle, DPO-family loss.

    align train online_dpo --config configs/online_dpo/testbed.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/online_dpo.py \
        --config configs/online_dpo/qwen2.5-0.5b-ultrafeedback.yaml

This module also holds what the three online recipes (online_dpo, xpo, egpo) share: the config base and the
trainer builder. Data: prompt rows (``prompt``, standard or conversational) with whatever columns the oracle
reads (``answer`` for ``verifier:accuracy``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.args import RecipeArguments
from align.recipe import Recipe, main, start, train_and_save
from align.trainers.online_args import OnlineConfig


@dataclass
class OnlineRecipeConfig(RecipeArguments, OnlineConfig):
    recipe_name = "online_dpo"
    method = "online_dpo"
    learning_rate: float = field(default=5e-7, metadata={"help": "Peak AdamW learning rate (TRL online DPO default)."})


def build_trainer(config, trainer_class=None):
    from align.data.prompts import load_prompt_data
    from align.modeling import load_policy_and_reference, lora_config
    from align.rewards.preference import build_oracle, check_columns
    from align.trainers.egpo import EGPOTrainer
    from align.trainers.online import OnlineDPOTrainer, XPOTrainer

    cls = trainer_class or {"online_dpo": OnlineDPOTrainer, "xpo": XPOTrainer, "egpo": EGPOTrainer}[config.method]
    # 1. Oracle and data, checked before a model is loaded.
    oracle = build_oracle(config.oracle, config.oracle_scale, timeout_s=config.reward_timeout_s)
    tokenizer, train, evaluation = load_prompt_data(config, lambda names, where: check_columns(oracle, names, where))

    # 2. Policy, and a separate reference only when one is named (default: a frozen copy of the policy).
    model, ref_model = load_policy_and_reference(config)
    return cls(model, config, train, evaluation, tokenizer, oracle=oracle, ref_model=ref_model,
               peft_config=lora_config(config), callbacks=start(config))


def run(config) -> dict:
    trainer = build_trainer(config)
    return train_and_save(trainer, config, **{"oracle/calls": lambda: trainer.oracle_calls})


RECIPE = Recipe("online_dpo", "Online DPO: policy samples labelled by a preference oracle (dpo, ipo, ... loss).",
                OnlineRecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
