"""Supervised fine-tuning (SFT) on prompt/completion, messages or text data, via TRL's ``SFTTrainer``.

The library side of ``recipes/sft.py``: its config and the whole run, so the testbed's SFT warm-up
(:mod:`align.testbed.build`) trains through the same code without depending on a recipe script. With
prompt/completion rows the loss covers completion tokens only (TRL's default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trl import SFTConfig

from align.args import CPUSaneDefaults, RecipeArguments
from align.errors import ConfigError


@dataclass
class SFTArguments(RecipeArguments, CPUSaneDefaults, SFTConfig):
    recipe_name = "sft"

    def validate(self) -> None:
        if self.packing and self.completion_only_loss:
            raise ConfigError("packing / completion_only_loss: packed sequences cannot mask prompts; disable one")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length: must be >= 2 (or null: no truncation), got {self.max_length}")


def train_sft(config: SFTArguments, callbacks: Callable[[], list] = list) -> dict:
    """Train ``config``'s model on its data, save it to ``output_dir`` and evaluate when there is eval data; returns
    the output folder and every metric. ``callbacks()`` is called once data and model are loaded (a recipe's
    bookkeeping, e.g. :func:`align.recipe.start`) and gives the trainer callbacks."""
    from transformers import set_seed
    from trl import SFTTrainer

    from align.checkpoints import with_atomic_checkpoints
    from align.data.loading import load_train_eval
    from align.data.validate import sft_layout
    from align.modeling import load_model, load_tokenizer, lora_config
    from align.precision import weights_dtype
    from align.recipe import train_and_save
    from align.stopping import StopCallback
    from align.trainers.base import EngineCallback
    from align.trainers.hub_sync import without_trainer_push

    # 1. Data first: a bad row stops the run before any model is loaded.
    train, evaluation = load_train_eval(config)
    sft_layout(train, "train")
    if evaluation is not None:
        sft_layout(evaluation, "eval")

    # 2. Model and tokenizer.
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    model = load_model(config.model_name_or_path, weights_dtype(config), config.attn_implementation,
                       config.trust_remote_code)  # float32 master weights under a half torch_dtype

    # 3. Train, save (seeded first: a LoRA adapter's random init must follow the run's seed).
    set_seed(config.seed)
    trainer = with_atomic_checkpoints(without_trainer_push(SFTTrainer))(  # checkpoints renamed into place; no push
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[*callbacks(), StopCallback()],  # SIGTERM / SIGINT: a checkpoint at the step's end, then stop
    )
    trainer.add_callback(EngineCallback(trainer))  # DeepSpeed: each process says its stage and partition
    out = train_and_save(trainer, config)
    trainer.accelerator.wait_for_everyone()
    return out
