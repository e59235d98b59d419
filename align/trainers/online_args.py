"""Arguments of the online preference trainers (online DPO, XPO, EGPO / online IPO).

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

import os
from dataclasses import dataclass

from align.args import PromptArguments, _f
from align.errors import ConfigError
from align.rollout.args import RolloutArguments
from align.rewards.preference import ORACLE_KINDS

PAIR_OBJECTIVES = ("dpo", "ipo", "hinge", "robust", "hdpo", "lrdpo")
EGPO_VARIANTS = ("oipo1", "oipo2")


@dataclass
class OnlineArguments(PromptArguments, RolloutArguments):
    # --- objective ---
    objective: str = _f("dpo", f"Pair loss of online DPO and XPO, one of {PAIR_OBJECTIVES} (EGPO: online_ipo).")
    beta: float = _f(0.1, "KL strength β (τ for ipo; EGPO's target is P-gap / β).")
    xpo_alpha: list[float] = _f([1e-5], "XPO: weight α of the exploration term α·S_θ(ỹ) on the reference sample; a "
                                        "list is a per-epoch schedule (the last value repeats).")
    egpo_variant: str = _f("oipo1", f"EGPO target, one of {EGPO_VARIANTS}: oipo1 = P(y≻y″) − P(y′≻y″) against an "
                                    "opponent sample y″ from the policy; oipo2 = P(y≻y′) − ½ (lower variance).")
    egpo_extragradient: bool = _f(True, "EGPO: take the extragradient half step (false: plain online IPO).")
    mixture_coef: float = _f(0.0, "EGPO: sample (y, y′) from the token-level geometric mixture π_θ^(1−c)·π_ref^c "
                                  "(0: the policy).")
    # --- preference oracle ---
    oracle: str = _f("verifier:accuracy", f"Preference oracle P(y ≻ y′|x), one of {ORACLE_KINDS}.")
    oracle_scale: float = _f(1.0, "reward: oracles: Bradley–Terry temperature, P = σ((r − r′) / scale).")
    # --- generation ---
    max_prompt_length: int = _f(512, "Prompts longer than this (tokens) are rejected before training.")
    max_completion_length: int = _f(64, "Max new tokens per completion.")
    temperature: float = _f(1.0, "Sampling temperature of the pair (y, y′).")
    opponent_temperature: float = _f(1.0, "EGPO oipo1: temperature of the opponent sample y″.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    top_k: int = _f(0, "Top-k cut (0: none).")
    generation_batch_size: int = _f(64, "Sequences per generate call.")
    # --- reference / eval ---
    ref_model_name_or_path: str | None = _f(None, "Reference model (XPO samples ỹ from it); default: the initial "
                                                  "policy (with LoRA: the base model, adapter off).")
    eval_num_samples: int = _f(4, "Eval: completions per prompt for the win rate against the reference policy.")
    eval_max_new_tokens: int | None = _f(None, "Eval: max new tokens (default max_completion_length).")
    remove_unused_columns: bool = _f(False, "Keep every dataset column: the oracle may read them.")

    def validate_online(self, method: str, world: int = 1) -> None:
        """Every option check that needs no model and no data (``method``: online_dpo, xpo or egpo; ``world``
        processes)."""
        from align.objectives import check_params

        if method == "egpo":
            if self.objective != "online_ipo":
                raise ConfigError(f"objective: EGPO trains on online_ipo, got {self.objective!r}")
        elif self.objective not in PAIR_OBJECTIVES:
            raise ConfigError(f"objective: must be one of {PAIR_OBJECTIVES} for {method}, got {self.objective!r}")
        check_params(self.objective, {"beta": self.beta})
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.egpo_variant not in EGPO_VARIANTS:
            raise ConfigError(f"egpo_variant: must be one of {EGPO_VARIANTS}, got {self.egpo_variant!r}")
        if not self.xpo_alpha or any(a < 0 for a in self.xpo_alpha):
            raise ConfigError(f"xpo_alpha: needs one or more values >= 0, got {self.xpo_alpha}")
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ConfigError(f"mixture_coef: must be in [0, 1], got {self.mixture_coef}")
        if self.mixture_coef and method != "egpo":
            raise ConfigError(f"mixture_coef: only EGPO samples from a mixture, not {method}")
        if self.oracle_scale <= 0:
            raise ConfigError(f"oracle_scale: must be > 0, got {self.oracle_scale}")
        for key in ("max_prompt_length", "max_completion_length", "generation_batch_size", "eval_num_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "opponent_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0 for sampling, got {getattr(self, key)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps: must be 1 for online training (one optimizer step is one "
                              "generation round); lower per_device_train_batch_size to bound memory")
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        if method == "egpo" and self.egpo_extragradient and save == "steps" and int(self.save_steps) % 2:
            raise ConfigError(f"save_steps: must be even with EGPO's extragradient (a checkpoint between a half and a "
                              f"full step cannot be resumed exactly), got {self.save_steps}")
        self.validate_rollout(world)
        if method == "egpo" and self.rollout != "hf":
            if self.mixture_coef > 0:
                raise ConfigError(f"rollout: {self.rollout} cannot sample EGPO's geometric mixture (mixture_coef "
                                  f"{self.mixture_coef} > 0 needs the policy's and the reference's logits at every "
                                  "token); use rollout: hf, or mixture_coef: 0")
            if self.egpo_extragradient and self.vllm_sync_steps != 1:
                raise ConfigError(f"vllm_sync_steps: must be 1 with EGPO's extragradient (the full step samples from "
                                  f"the half step's weights θ_t+½), got {self.vllm_sync_steps}")
        if method == "egpo" and self.egpo_extragradient:
            sharded = sharded_optimizer(self)
            if sharded:
                raise ConfigError(f"egpo_extragradient: the half step's parameters and optimizer state cannot be "
                                  f"restored exactly under {sharded} (sharded optimizer state); launch with "
                                  "configs/accelerate/ddp.yaml")


def sharded_optimizer(args) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed"`` when the optimizer state is sharded across processes, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or getattr(args, "fsdp", None):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") or getattr(args, "deepspeed", None):
        return "DeepSpeed"
    return None
