"""Arguments of the online preference trainers (online DPO, XPO, EGPO / online IPO): the ``online`` config part
(:class:`OnlineArguments`) and :class:`OnlineConfig`, the online parts with the trainer part.

The batch knobs, named once: ``per_device_train_batch_size`` prompts per process per optimizer step; each
prompt gives one pair (two completions, plus one opponent sample y″ for EGPO's "online IPO 1"), labelled by
the ``oracle``. ``gradient_accumulation_steps`` must stay 1 (one optimizer step is one generation round).
With EGPO's extragradient on, every prompt batch is used for two optimizer steps (the half step and the full
step), so an epoch has twice the steps.

Rollouts (``rollout: hf | vllm | vllm-server``, :class:`~align.rollout.args.RolloutArguments`): the engine draws
the policy's samples; reference samples (XPO's ỹ) and EGPO's mixture samples need the reference model's
logits, which the engine does not hold, so they stay on the HF engine, and EGPO with ``mixture_coef > 0``
refuses a vLLM rollout (every one of its pairs is a mixture sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers import TrainingArguments

from align.args import CPUSaneDefaults, GenerationArguments, ObjectiveArguments, PromptArguments, option
from align.errors import ConfigError
from align.rewards.preference import ORACLE_KINDS
from align.rollout.args import RolloutArguments
from align.timeouts import REWARD_TIMEOUT_HELP, REWARD_TIMEOUT_S, check_timeout
from align.tracking import CompletionsLogArguments

EGPO_VARIANTS = ("oipo1", "oipo2")


def pair_objectives() -> list[str]:
    """The objectives online DPO and XPO can train on: those of the registry that need nothing but the pair."""
    from align.objectives import registry

    return [name for name, spec in registry().items() if not spec.needs]


@dataclass
class OnlineArguments(ObjectiveArguments, PromptArguments, GenerationArguments, RolloutArguments,
                      CompletionsLogArguments):
    """The online part (method, oracle, reference and eval keys of the online trainers), composed with the objective,
    prompt, generation and rollout parts it trains and samples with."""

    part = "online"
    method: ClassVar[str] = "online_dpo"  # online_dpo, xpo or egpo: set by each recipe's config class

    # --- objective (the objective part's keys, with the online defaults) ---
    objective: str = option("dpo", "Pair loss of online DPO and XPO: an objective of the registry that needs nothing "
                                   "but the pair (dpo, ipo, hinge, robust, rpo, hdpo, lrdpo, ...); EGPO: online_ipo.")
    beta: float = option(0.1, "KL strength β (τ for ipo; EGPO's target is P-gap / β).")
    # --- online ---
    xpo_alpha: list[float] = option([1e-5], "XPO: weight α of the exploration term α·S_θ(ỹ) on the reference sample; a "
                                            "list is a per-epoch schedule (the last value repeats).")
    egpo_variant: str = option("oipo1", f"EGPO target, one of {EGPO_VARIANTS}: oipo1 = P(y≻y″) − P(y′≻y″) against an "
                                        "opponent sample y″ from the policy; oipo2 = P(y≻y′) − ½ (lower variance).")
    egpo_extragradient: bool = option(True, "EGPO: take the extragradient half step (false: plain online IPO).")
    mixture_coef: float = option(0.0, "EGPO: sample (y, y′) from the token-level geometric mixture π_θ^(1−c)·π_ref^c "
                                      "(0: the policy).")
    # --- preference oracle ---
    oracle: str = option("verifier:accuracy", f"Preference oracle P(y ≻ y′|x), one of {ORACLE_KINDS}.")
    oracle_scale: float = option(1.0, "reward: oracles: Bradley–Terry temperature, P = σ((r − r′) / scale).")
    reward_timeout_s: float = option(REWARD_TIMEOUT_S, REWARD_TIMEOUT_HELP)
    # --- generation (the generation part's keys, with the online defaults) ---
    max_completion_length: int = option(64, "Max new tokens per completion.")
    temperature: float = option(1.0, "Sampling temperature of the pair (y, y′).")
    opponent_temperature: float = option(1.0, "EGPO oipo1: temperature of the opponent sample y″.")
    # --- reference / eval ---
    ref_model_name_or_path: str | None = option(None, "Reference model (XPO samples ỹ from it); default: the initial "
                                                      "policy (with LoRA: the base model, adapter off).")
    eval_num_samples: int = option(4, "Eval: completions per prompt for the win rate against the reference policy.")
    eval_max_new_tokens: int | None = option(None, "Eval: max new tokens (default max_completion_length).")
    remove_unused_columns: bool = option(False, "Keep every dataset column: the oracle may read them.")

    def validate(self) -> None:
        """The online part's own keys, and the objective, generation and rollout keys they depend on."""
        if self.method == "egpo":
            if self.objective != "online_ipo":
                raise ConfigError(f"objective: EGPO trains on online_ipo, got {self.objective!r}")
        elif self.objective not in pair_objectives():
            raise ConfigError(f"objective: must be one of {tuple(pair_objectives())} for {self.method}, got "
                              f"{self.objective!r}")
        if self.egpo_variant not in EGPO_VARIANTS:
            raise ConfigError(f"egpo_variant: must be one of {EGPO_VARIANTS}, got {self.egpo_variant!r}")
        if not self.xpo_alpha or any(not 0 <= a < float("inf") for a in self.xpo_alpha):
            raise ConfigError(f"xpo_alpha: needs one or more finite values >= 0, got {self.xpo_alpha}")
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ConfigError(f"mixture_coef: must be in [0, 1], got {self.mixture_coef}")
        if self.mixture_coef and self.method != "egpo":
            raise ConfigError(f"mixture_coef: only EGPO samples from a mixture, not {self.method}")
        if not 0 < self.oracle_scale < float("inf"):  # inf would make every pair a tie
            raise ConfigError(f"oracle_scale: must be > 0 and finite, got {self.oracle_scale}")
        check_timeout("reward_timeout_s", self.reward_timeout_s)
        if self.eval_num_samples < 1:
            raise ConfigError(f"eval_num_samples: must be >= 1, got {self.eval_num_samples}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ConfigError(f"eval_max_new_tokens: must be >= 1 (or null: max_completion_length), got "
                              f"{self.eval_max_new_tokens}")
        if self.opponent_temperature <= 0:
            raise ConfigError(f"opponent_temperature: must be > 0 for sampling, got {self.opponent_temperature}")
        if self.ref_model_name_or_path:
            from align.modeling import check_model_path

            check_model_path(self.ref_model_name_or_path, "ref_model_name_or_path")
        if self.method == "egpo" and self.rollout != "hf":
            if self.mixture_coef > 0:
                raise ConfigError(f"rollout: {self.rollout} cannot sample EGPO's geometric mixture (mixture_coef "
                                  f"{self.mixture_coef} > 0 needs the policy's and the reference's logits at every "
                                  "token); use rollout: hf, or mixture_coef: 0")
            if self.egpo_extragradient and self.vllm_sync_steps != 1:
                raise ConfigError(f"vllm_sync_steps: must be 1 with EGPO's extragradient (the full step samples from "
                                  f"the half step's weights θ_t+½), got {self.vllm_sync_steps}")


@dataclass
class OnlineConfig(OnlineArguments, CPUSaneDefaults, TrainingArguments):
    """The online parts with the trainer part (recipes add model and data keys on top); :meth:`validate` holds the
    checks that need both: one generation round per optimizer step, EGPO's checkpoints and the launcher's
    sharding."""

    def validate(self) -> None:
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps: must be 1 for online training (one optimizer step is one "
                              "generation round); lower per_device_train_batch_size to bound memory")
        if self.mixture_coef > 0 and getattr(self, "use_peft", False) and not self.ref_model_name_or_path:
            raise ConfigError(f"mixture_coef: {self.mixture_coef} with use_peft needs ref_model_name_or_path (the "
                              "mixture runs the policy and the reference side by side in one generate call; LoRA's "
                              "reference is the policy with its adapter off); name the reference, or mixture_coef: 0")
        if self.method != "egpo" or not self.egpo_extragradient:
            return
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        if save == "steps" and int(self.save_steps) % 2:
            raise ConfigError(f"save_steps: must be even with EGPO's extragradient (a checkpoint between a half and a "
                              f"full step cannot be resumed exactly), got {self.save_steps}")
        # under align's fully_shard and DeepSpeed's ZeRO optimizers each process restores its own part of the
        # parameters and optimizer state (align/fsdp2.py, align/zero3.py): every sharding runs
