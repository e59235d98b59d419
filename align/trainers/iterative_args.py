"""The iterative driver's config part (:class:`IterativeArguments`): iterations, K, the oracle, APO's α, the win rate;
the driver itself is :mod:`align.trainers.iterative`."""

from __future__ import annotations

from dataclasses import dataclass

from align.args import GenerationArguments, PromptArguments, option
from align.errors import ConfigError
from align.hub_args import check_iterative
from align.rollout.args import RolloutArguments
from align.timeouts import REWARD_TIMEOUT_HELP, REWARD_TIMEOUT_S, check_timeout


@dataclass
class IterativeArguments(PromptArguments, GenerationArguments, RolloutArguments):
    """The iterative part (iterations, K, oracle, APO, win rate), composed with the prompt, generation and rollout
    parts it samples with (the K responses follow every generation key; the win-rate samples
    ``max_completion_length`` and ``temperature``)."""

    part = "iterative"
    RENAMED = {"max_new_tokens": "max_completion_length", "sample_temperature": "temperature"}

    iterations: int = option(3, "Number of iterations T (sample -> judge -> train a round).")
    samples_per_prompt: int = option(4, "K: responses sampled per prompt each iteration; best and worst make the "
                                        "pair.")
    oracle: str = option("verifier:accuracy", "Preference oracle: verifier:<fn>, reward:<reward spec> (e.g. "
                                              "reward:model:<path>), pairwise:<model path>, cyclic, module:function.")
    oracle_scale: float = option(1.0, "reward: oracles: P(a ≻ b) = σ((r(a) − r(b)) / oracle_scale).")
    reward_timeout_s: float = option(REWARD_TIMEOUT_S, REWARD_TIMEOUT_HELP)
    apo_alpha: float | None = option(None, "APO momentum α in [0, 1): reference (1+α)·S_{π_t} − α·S_{π_{t−1}}; "
                                           "null: plain iterative DPO (reference S_{π_t}).")
    prompts_per_iteration: int | None = option(None, "Prompts per iteration, consecutive chunks of the train set "
                                                     "(wrapping around); null: every prompt every iteration.")
    chat_prompt: bool = option(False, "Wrap a string prompt as one user message, so the chat template applies.")
    # --- generation (the generation part's keys, with the iterative defaults) ---
    max_prompt_length: int = option(256, "Longest prompt in tokens; a longer one is a data error.")
    max_completion_length: int = option(32, "Longest sampled response in tokens (also of the win-rate samples).")
    temperature: float = option(1.0, "Sampling temperature of the K responses (and of the win-rate samples).")
    eval_num_samples: int = option(4, "Win rate vs the initial policy: samples per held-out prompt (0: no win rate).")
    push_every_iteration: bool = option(False, "With push_to_hub: upload each finished iteration as iter-<t>/ (in "
                                               "the background), not only the last one at the end.")

    def validate(self) -> None:
        """The iterative part's own keys, and the rollout keys they depend on (before any model or generation)."""
        if self.iterations < 1:
            raise ConfigError(f"iterations: must be >= 1, got {self.iterations}")
        check_timeout("reward_timeout_s", self.reward_timeout_s)
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt: must be >= 2 to make a best/worst pair, got "
                              f"{self.samples_per_prompt}")
        if self.apo_alpha is not None and not 0 <= self.apo_alpha < 1:
            raise ConfigError(f"apo_alpha: must be in [0, 1) (or null), got {self.apo_alpha}")
        if self.prompts_per_iteration is not None and self.prompts_per_iteration < 1:
            raise ConfigError(f"prompts_per_iteration: must be >= 1 (or null), got {self.prompts_per_iteration}")
        if self.eval_num_samples < 0:
            raise ConfigError(f"eval_num_samples: must be >= 0, got {self.eval_num_samples}")
        if self.rollout != "hf" and self.vllm_sync_steps != 1:
            raise ConfigError(f"vllm_sync_steps: the iterative driver pushes π_t's weights at the start of every "
                              f"iteration (the policy changes only between iterations); leave it at 1, got "
                              f"{self.vllm_sync_steps}")
        check_iterative(self)
