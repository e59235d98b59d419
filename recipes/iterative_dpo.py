"""Iterative preference training (iterative DPO, iLR-DPO, APO): sample K responses per prompt from the
current policy, let an oracle pick best and worst, train a round of any preference objective against the
iteration's reference, repeat (``align/trainers/iterative.py``).

    align train iterative_dpo --config configs/iterative/testbed-ilr-dpo.yaml            # iLR-DPO (lrdpo)
    align train iterative_dpo --config configs/iterative/testbed-ilr-dpo.yaml objective=dpo   # plain iterative DPO
    align train iterative_dpo --config configs/iterative/testbed-apo.yaml                # APO (apo_alpha)
    align train iterative_dpo --config configs/iterative/testbed-apo.yaml resume_from_checkpoint=true

Data: prompt rows (``prompt``, standard or conversational, or ``prompt_column``) with whatever columns the
oracle reads (``answer`` for ``verifier:accuracy``). ``max_steps`` / ``num_train_epochs`` apply to each
iteration's round. The held-out split (``dataset_test_split``) gives the win rate against the initial policy.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from align.args import RecipeArguments
from align.errors import ConfigError
from align.recipe import Recipe, main, row_counts, start
from align.trainers.iterative_args import IterativeArguments
from align.trainers.preference import PreferenceConfig


@dataclass
class IterativeRecipeConfig(IterativeArguments, RecipeArguments, PreferenceConfig):
    recipe_name = "iterative_dpo"
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate of every round."})

    def validate(self) -> None:
        """The checks that need the iterative part and the preference part together."""
        if self.ref_model_name_or_path:
            raise ConfigError("ref_model_name_or_path: the iterative driver's reference is each iteration's start "
                              "policy; leave it unset")
        if not self.precompute_ref_logps:
            raise ConfigError("precompute_ref_logps: must be true for the iterative driver (it supplies them)")
        from align.args import world_size  # read at call time (tests patch it)

        world = world_size()
        if world > 1 and not self.dataloader_drop_last:
            raise ConfigError(f"dataloader_drop_last: must be true for the iterative driver on {world} processes: a "
                              "round's pairs are counted only after sampling, and accelerate would fill a last "
                              "partial batch with pairs repeated from the start (one process trains on the remainder)")

    def check_output_dir(self) -> None:
        """Resume means: skip the finished ``iter-*`` folders and continue the unfinished one."""
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.recipe_name)
        out, resume = self.output_dir, str(self.resume_from_checkpoint or "").lower()
        started = os.path.isdir(out) and any(n.startswith("iter-") for n in os.listdir(out))
        if resume in ("true", "last", "latest"):
            if not started:
                raise ConfigError(f"resume_from_checkpoint: no iter-* folder in output_dir {out!r}")
            self.resume_from_checkpoint = "true"
        elif resume not in ("", "false", "none"):
            raise ConfigError(f"resume_from_checkpoint: the iterative driver resumes its own output_dir; pass true "
                              f"(got {self.resume_from_checkpoint!r})")
        else:
            self.resume_from_checkpoint = None
            if started and not self.overwrite_output_dir:
                raise ConfigError(f"output_dir: {out!r} already holds iterations; resume with "
                                  "resume_from_checkpoint=true, or pass overwrite_output_dir=true, or choose another "
                                  "output_dir")


def build_driver(config: IterativeRecipeConfig, callbacks=None):
    from align.data.prompts import load_prompt_data
    from align.rewards.preference import build_oracle, check_columns
    from align.trainers.iterative import IterativeDPO

    # 1. Oracle and prompts, all checked before a model is loaded or anything generated.
    options = {"max_completion_length": config.max_completion_length}
    oracle = build_oracle(config.oracle, config.oracle_scale, options, config.reward_timeout_s)
    tokenizer, train, evaluation = load_prompt_data(
        config, lambda names, where: check_columns(oracle, names, where),
        (lambda ds: ds.map(_as_message)) if config.chat_prompt else None)

    # 2. The driver loads every policy it needs itself (initial, each iteration's start, the previous one).
    return IterativeDPO(config, train, evaluation, tokenizer, oracle, [*start(config), *(callbacks or [])])


def _as_message(row):
    p = row["prompt"]
    return {"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p}


def run(config: IterativeRecipeConfig, callbacks=None) -> dict:
    driver = build_driver(config, callbacks)
    records = driver.run()
    return {"output_dir": os.path.abspath(config.output_dir), "iterations": records,
            "rows": row_counts(driver.train, driver.evaluation)}


RECIPE = Recipe("iterative_dpo", "Iterative preference training: sample K, oracle best/worst, a DPO/lrdpo round per "
                "iteration (iLR-DPO; APO with apo_alpha).", IterativeRecipeConfig, run)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
