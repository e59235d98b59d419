"""Offline preference optimisation: one recipe for every offline objective (``objective:`` in the config).

    align train dpo --config configs/dpo/testbed.yaml
    align train dpo --config configs/dpo/testbed.yaml objective=hdpo alpha=0.9
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/dpo.py \
        --config configs/dpo/qwen2.5-0.5b-ultrafeedback.yaml

Data: TRL preference rows (prompt/chosen/rejected, standard or conversational). Reference log-probs are
precomputed once by default (``precompute_ref_logps``), so no reference model stays in memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.args import RecipeArguments
from align.recipe import Recipe, main, start, train_and_save
from align.trainers.preference import PreferenceConfig


@dataclass
class DPORecipeConfig(RecipeArguments, PreferenceConfig):
    recipe_name = "dpo"
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate (TRL's DPO default)."})


def build_trainer(config: DPORecipeConfig):
    from align.args import world_size
    from align.checks import check_even_batches
    from align.data.loading import load_train_eval
    from align.data.preference import tokenize_preferences
    from align.modeling import load_policy_and_reference, load_tokenizer, lora_config
    from align.trainers.preference import PreferenceTrainer

    # 1. Data, checked row by row while tokenised: every data error comes before a model is loaded.
    train, evaluation = load_train_eval(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    train = tokenize_preferences(train, tokenizer, config.max_length, "train")
    check_even_batches(len(train), config, world_size())  # N processes must train on 1 process's rows
    if evaluation is not None:
        evaluation = tokenize_preferences(evaluation, tokenizer, config.max_length, "eval")

    # 2. Policy, and a separate frozen reference only when one is named.
    model, ref_model = load_policy_and_reference(config)

    return PreferenceTrainer(model, config, train, evaluation, tokenizer, ref_model=ref_model,
                             peft_config=lora_config(config), callbacks=start(config))


def run(config: DPORecipeConfig) -> dict:
    trainer = build_trainer(config)
    return train_and_save(trainer, config)


RECIPE = Recipe("dpo", "Offline preference optimisation (dpo, ipo, hinge, robust, rpo, hdpo, lrdpo, ...).",
                DPORecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
