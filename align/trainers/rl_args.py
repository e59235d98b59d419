"""Arguments of the RL loop (GRPO and variants, RAFT / RAFT++, GVM and dynamic sampling): the ``RL`` config part
(:class:`RLArguments`) and :class:`RLConfig`, the RL parts with the trainer part.

The batch knobs, named once (``describe()`` prints them with the effective numbers):

* ``per_device_train_batch_size`` — prompts per process per generation round; the round's prompt
  batch is m = that × processes.
* ``num_generations`` — completions per prompt with the ``uniform`` allocator; with ``gvm`` the round's
  budget is N = ``num_generations`` × m rollouts, spread unevenly; with ``dynamic`` the group size.
* ``num_minibatches`` × ``num_iterations`` (μ) — optimizer updates per round: the round's rollouts are
  split into ``num_minibatches`` mini-batches, and the whole set is passed over μ times.
* ``micro_batch_size`` — sequences per forward/backward (memory only; the gradient is the same).
* ``max_tokens_per_micro_batch`` (the trainer part) — padded tokens per forward of the no-gradient old /
  reference log-prob passes.
* ``gradient_accumulation_steps`` must stay 1: one optimizer step is one mini-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainingArguments

from align.args import CPUSaneDefaults, GenerationArguments, PromptArguments, option
from align.errors import ConfigError
from align.objectives.advantages import ADVANTAGES, SCALES
from align.objectives.policy import KL_ESTIMATOR_NAMES, LOSS_TYPES, POLICY_LOSSES
from align.rollout.args import RolloutArguments
from align.sampling.allocators import ALLOCATORS as ALLOCATOR_REGISTRY
from align.sharding import own_fsdp2, sharding
from align.timeouts import REWARD_TIMEOUT_HELP, REWARD_TIMEOUT_S, check_timeout
from align.tracking import CompletionsLogArguments

ALLOCATORS = ALLOCATOR_REGISTRY.names()


@dataclass
class RLArguments(PromptArguments, GenerationArguments, RolloutArguments, CompletionsLogArguments):
    """The RL part (objective, batch, rewards, allocation, reference and eval keys of the RL loop), composed with
    the prompt, generation and rollout parts it samples with."""

    part = "RL"

    # --- objective ---
    advantage: str = option("grpo", f"Advantage estimator, one of {ADVANTAGES}: grpo (group-centred) or raft (1 if "
                                    "accepted else 0).")
    policy_loss: str = option("clip", f"Policy loss, one of {POLICY_LOSSES}: clip (PPO/GRPO surrogate; RAFT++) or nll "
                                      "(plain RAFT).")
    loss_type: str = option("dapo", f"Loss aggregation, one of {LOSS_TYPES} (docs/methods.md §11).")
    scale_rewards: str = option("group", f"Advantage scaling, one of {SCALES} (none = Dr.GRPO).")
    epsilon: float = option(0.2, "Clip range ε (lower).")
    epsilon_high: float | None = option(None, "Upper clip range (DAPO clip-higher, e.g. 0.28); default ε.")
    beta: float = option(0.0, "k3 KL coefficient to the reference (0: no reference model is kept).")
    kl_estimator: str = option("k3", f"KL term per token, one of {KL_ESTIMATOR_NAMES}: k3 (+β·k3) or k3_is "
                                     "(+β·ρ·k3, ρ = π_θ/π_old: TRL's default use_bias_correction_kl=True).")
    accept_threshold: float = option(0.5, "A rollout is accepted (RAFT advantage 1, GVM acceptance) when its total "
                                          "reward exceeds this.")
    mask_truncated_completions: bool = option(False, "Leave completions cut at max_completion_length out of the loss "
                                                     "(DAPO overlong filtering).")
    # --- batch ---
    num_generations: int = option(8, "Completions per prompt (uniform, dynamic); GVM budget per prompt (N = this "
                                     "x m).")
    num_minibatches: int = option(1, "Optimizer updates per round and iteration (the rollouts are split this many "
                                     "ways).")
    num_iterations: int = option(1, "μ: passes over each round's rollouts (old log-probs are kept from generation).")
    micro_batch_size: int = option(64, "Sequences per forward/backward pass (memory knob; same gradient).")
    # --- vLLM rollouts (the engine's options: align.rollout.args.RolloutArguments) ---
    vllm_is_cap: float | None = option(2.0, "Truncated importance sampling: weigh each token's loss by min(π_old / "
                                            "π_vLLM, cap), correcting the sampler/trainer mismatch; None: off.")
    # --- rewards ---
    reward_funcs: list[str] = option(["accuracy"], "Reward functions: names (accuracy, format, math_verify, "
                                                   "overlong), `module:function`, or `model:<path>` (a reward model).")
    reward_weights: list[float] | None = option(None, "One weight per reward function (default all 1).")
    on_reward_error: str = option("raise", "A reward function that raises or returns NaN: raise (stop the step, "
                                           "naming the function and prompt) or zero (score 0, counted in "
                                           "rewards/<name>/errors).")
    reward_timeout_s: float = option(REWARD_TIMEOUT_S, REWARD_TIMEOUT_HELP)
    overlong_cache_length: int = option(0, "overlong reward: the soft-punishment zone before max_completion_length.")
    # --- allocation ---
    allocator: str = option("uniform", f"How many rollouts each prompt gets, one of {ALLOCATORS}.")
    gvm_samples: int = option(8, "GVM N': estimation samples per prompt (acceptance rate p_i and grad norm G_i).")
    gvm_interval: int = option(1, "Re-estimate a prompt's (p_i, G_i) when older than this many rounds.")
    gvm_alpha: float = option(1e-3, "GVM α (regulariser of small acceptance rates).")
    gvm_beta: float = option(2.0, "GVM β.")
    gvm_filter_threshold: float = option(1.0, "GVM: drop prompts with p_i above this (1.0: off).")
    gvm_filter_insufficient: float = option(0.0, "GVM: drop prompts expected to get fewer accepted samples (0: off).")
    gvm_min_n: int = option(0, "GVM: at least this many rollouts per prompt.")
    gvm_max_n: int | None = option(None, "GVM: at most this many rollouts per prompt (none: no cap).")
    gvm_reuse_samples: bool = option(False, "GVM: train on the estimation samples too (the paper discards them).")
    gvm_grad_params: list[str] = option(["embed_tokens"], "GVM: parameters (name substrings) whose gradient norm is "
                                                          "G_i.")
    grad_norm_monitor_steps: int | None = option(None, "Per-prompt gradient-norm monitor: every this many rounds, "
                                                       "measure p_i and G_i on the round's own rollouts into the "
                                                       "prompt-stats store (GVM allocates from it; logged as "
                                                       "grad_norm/*); None: off.")
    dynamic_max_rounds: int = option(3, "dynamic: at most this many extra sampling rounds to replace zero-variance "
                                        "groups.")
    # --- reference / eval ---
    ref_model_name_or_path: str | None = option(None, "Reference for the KL term; default: the initial policy.")
    eval_max_new_tokens: int | None = option(None, "Eval: max new tokens (default max_completion_length).")
    eval_num_samples: int = option(8, "Eval: also sample this many completions per prompt at `temperature` (mean@k; 0: "
                                      "greedy only).")
    remove_unused_columns: bool = option(False, "Keep every dataset column: reward functions read them.")

    @property
    def updates_per_round(self) -> int:
        return self.num_minibatches * self.num_iterations

    def validate(self) -> None:
        """The RL part's own keys, and the generation and rollout keys they depend on."""
        choices = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES, "loss_type": LOSS_TYPES,
                   "kl_estimator": KL_ESTIMATOR_NAMES,
                   "scale_rewards": SCALES, "allocator": ALLOCATORS,
                   "on_reward_error": ("raise", "zero")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: must be one of {allowed}, got {getattr(self, key)!r}")
        check_timeout("reward_timeout_s", self.reward_timeout_s)
        positive = ("num_generations", "num_minibatches", "num_iterations", "micro_batch_size", "gvm_samples",
                    "gvm_interval")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.grad_norm_monitor_steps is not None and self.grad_norm_monitor_steps < 1:
            raise ConfigError(f"grad_norm_monitor_steps: must be >= 1 (None turns the monitor off), got "
                              f"{self.grad_norm_monitor_steps}")
        if self.epsilon < 0:
            raise ConfigError(f"epsilon: must be >= 0, got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ConfigError(f"epsilon_high: must be >= epsilon ({self.epsilon}), got {self.epsilon_high}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        if self.dynamic_max_rounds < 0:
            raise ConfigError(f"dynamic_max_rounds: must be >= 0, got {self.dynamic_max_rounds}")
        if self.gvm_min_n < 0 or (self.gvm_max_n is not None and self.gvm_max_n < max(self.gvm_min_n, 1)):
            raise ConfigError(f"gvm_min_n / gvm_max_n: need 0 <= min_n <= max_n, got {self.gvm_min_n} / "
                              f"{self.gvm_max_n}")
        if self.allocator in ("uniform", "dynamic") and self.advantage == "grpo" and self.num_generations < 2:
            raise ConfigError("num_generations: GRPO groups need at least 2 completions per prompt")
        if self.overlong_cache_length < 0 or self.overlong_cache_length > self.max_completion_length:
            raise ConfigError(f"overlong_cache_length: must be in [0, max_completion_length], got "
                              f"{self.overlong_cache_length}")
        if self.rollout != "hf" and self.vllm_is_cap is not None and self.vllm_is_cap < 1:
            raise ConfigError(f"vllm_is_cap: must be >= 1 (None turns the correction off), got {self.vllm_is_cap}")
        if not math.isfinite(self.accept_threshold):
            raise ConfigError(f"accept_threshold: must be a finite number, got {self.accept_threshold}")
        if not (math.isfinite(self.gvm_alpha) and self.gvm_alpha >= 0) or not math.isfinite(self.gvm_beta):
            raise ConfigError(f"gvm_alpha / gvm_beta: need a finite gvm_alpha >= 0 and a finite gvm_beta, got "
                              f"{self.gvm_alpha} / {self.gvm_beta}")
        if self.eval_num_samples < 0:
            raise ConfigError(f"eval_num_samples: must be >= 0 (0: greedy only), got {self.eval_num_samples}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ConfigError(f"eval_max_new_tokens: must be >= 1 (or null: max_completion_length), got "
                              f"{self.eval_max_new_tokens}")
        if self.ref_model_name_or_path:
            if not self.beta:
                raise ConfigError("ref_model_name_or_path: set, but beta is 0, so there is no KL term and no "
                                  "reference; set beta > 0, or remove it")
            from align.modeling import check_model_path

            check_model_path(self.ref_model_name_or_path, "ref_model_name_or_path")


@dataclass
class RLConfig(RLArguments, CPUSaneDefaults, TrainingArguments):
    """The RL parts with the trainer part (recipes add model and data keys on top); :meth:`validate` holds the checks
    that need both: the round against the batch, checkpoints against rounds, and the launcher's sharding."""

    def validate(self, world: int) -> None:
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps: must be 1 in the RL loop (one optimizer step is one "
                              "mini-batch); set micro_batch_size to bound memory instead")
        prompts = self.per_device_train_batch_size * world
        if self.allocator == "gvm" and self.gvm_min_n * prompts > self.num_generations * prompts:
            raise ConfigError(f"gvm_min_n: budget num_generations x prompts = {self.num_generations * prompts} is "
                              f"smaller than gvm_min_n x prompts = {self.gvm_min_n * prompts}")
        if (prompts * self.num_generations) % self.num_minibatches:
            raise ConfigError(f"num_minibatches: {self.num_minibatches} does not divide the round's "
                              f"{prompts * self.num_generations} rollouts (per_device_train_batch_size "
                              f"{self.per_device_train_batch_size} "
                              f"x processes {world} x num_generations {self.num_generations})")
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        if save == "steps" and self.save_steps >= 1 and int(self.save_steps) % self.updates_per_round:
            raise ConfigError(f"save_steps: must be a multiple of the {self.updates_per_round} updates per round "
                              "(num_minibatches x num_iterations), so a resumed run restarts at a round boundary")
        shards = sharding(self)
        # align's own fully_shard (align/fsdp2.py) and ZeRO-3 (align/zero3.py) both generate from gathered weights;
        # an FSDP config align does not shard itself would leave generation to accelerate's FSDP
        if shards.kind == "FSDP" and not own_fsdp2(self):
            raise ConfigError(f"distributed_type: the RL loop does not run under {shards.kind} yet (each process "
                              "generates its own groups and estimates G_i on unsharded weights, so sharded forwards "
                              "would not line up and would hang); launch with configs/accelerate/fsdp2.yaml, "
                              "ddp.yaml, zero1.yaml or zero2.yaml")

    def describe(self, world: int = 1) -> str:
        m = self.per_device_train_batch_size * world
        rollouts = m * self.num_generations
        how = {"uniform": f"{self.num_generations} completions each", "dynamic":
               f"{self.num_generations} each, zero-variance groups resampled up to {self.dynamic_max_rounds} rounds",
               "gvm": f"a GVM budget of {rollouts} rollouts spread by (p_i, G_i) from {self.gvm_samples} estimation "
                      "samples per prompt"}.get(self.allocator, f"allocator {self.allocator}")
        return (f"RL round = per_device_train_batch_size {self.per_device_train_batch_size} x processes {world} = {m} "
                f"prompts, {how}; {rollouts} rollouts -> num_minibatches {self.num_minibatches} x num_iterations "
                f"{self.num_iterations} = {self.updates_per_round} optimizer steps per round; micro_batch_size "
                f"{self.micro_batch_size} sequences per forward")
