"""Supervised fine-tuning (SFT) on prompt/completion, messages or text data, via TRL's SFTTrainer.

    align train sft --config configs/sft/testbed.yaml
    accelerate launch recipes/sft.py --config configs/sft/testbed.yaml max_steps=50

With prompt/completion rows the loss covers completion tokens only (TRL's default). The testbed's
SFT warm-up (``align testbed build``) runs this recipe.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from trl import SFTConfig

from align.args import CPUSaneDefaults, RecipeArguments
from align.recipe import Recipe, main, start


@dataclass
class SFTRecipeConfig(RecipeArguments, CPUSaneDefaults, SFTConfig):
    recipe_name = "sft"

    def validate(self) -> None:
        super().validate()
        if self.packing and self.completion_only_loss:
            from align.errors import ConfigError

            raise ConfigError("packing / completion_only_loss: packed sequences cannot mask prompts; disable one")


def run(config: SFTRecipeConfig) -> dict:
    from transformers import set_seed
    from trl import SFTTrainer

    from align.data.loading import load_train_eval
    from align.data.validate import sft_layout
    from align.modeling import load_model, load_tokenizer, lora_config

    # 1. Data first: a bad row stops the run before any model is loaded.
    train, evaluation = load_train_eval(config)
    sft_layout(train, "train")
    if evaluation is not None:
        sft_layout(evaluation, "eval")

    # 2. Model and tokenizer.
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    model = load_model(config.model_name_or_path, config.torch_dtype, config.attn_implementation,
                       config.trust_remote_code)

    # 3. Train, save (seeded first: a LoRA adapter's random init must follow the run's seed).
    set_seed(config.seed)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=start(config),
    )
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    trainer.accelerator.wait_for_everyone()
    return {"output_dir": os.path.abspath(config.output_dir), **metrics}


RECIPE = Recipe("sft", "Supervised fine-tuning (TRL SFTTrainer) on prompt/completion or chat data.",
                SFTRecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
