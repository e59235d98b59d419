"""Config parts: the named dataclasses every recipe's config is composed from, and the one driver that checks them.

A recipe's config is one dataclass composed of parts: ``@dataclass class MyConfig(RecipeArguments, XConfig)``,
where :class:`RecipeArguments` = model + data + LoRA + outputs, and ``XConfig`` = the method's parts (prompt,
generation, rollout, objective, RL / online / iterative / preference) + the trainer part (the TRL/transformers
training arguments, with :class:`CPUSaneDefaults`). Each part names itself (``part = "generation"``, its
``--help`` heading) and checks only its own fields in ``validate()``; a check that needs the fields of two parts
lives on the composed class that has both. :func:`validate_config` runs every part's check in :data:`PARTS`
order, then the composed classes' checks, before any model or dataset is loaded (see
:func:`align.config.load_config`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, fields
from typing import Literal

from align.checkpoints import clear_previous_run
from align.checks import (
    STEP_RULES,
    TRAINER_RULES,
    apply_rules,
    check_attn_implementation,
    check_file_in_dir,
    check_logits_block_size,
    check_padding_free,
    check_report_to,
    check_writable_dir,
)
from align.errors import ConfigError
from align.hub_args import HubArguments
from align.options import option
from align.precision import apply_master_weights
from align.sharding import apply_deepspeed_on_cpu, check_launch, deepspeed_on_cpu, has_accelerator
from align.testbed.arith import TASKS as SPEC3_TASKS
from align.testbed.tasks import DEFAULT_TASKS, FORMATS, TASKS

DTYPES = ("float32", "bfloat16", "float16", "auto")
# The parts, in --help and validation order; a part not named here comes just before the trainer.
PARTS = ("model", "data", "LoRA", "outputs", "prompt", "generation", "rollout", "objective", "RL", "online",
         "iterative", "preference", "trainer")


def _rank(title: str) -> float:
    return PARTS.index(title) if title in PARTS else PARTS.index("trainer") - 0.5


def part_of(cls: type, name: str) -> str:
    """The title of the part that defines field ``name`` of config class ``cls`` (the most basic part class that
    declares it; a recipe that only changes a default keeps the field in its part); ``"trainer"`` for the
    TRL/transformers training arguments."""
    for klass in reversed(cls.__mro__):
        if "part" in klass.__dict__ and name in inspect.get_annotations(klass):
            return klass.part
    return "trainer"


def part_order(cls: type, names) -> list[str]:
    """``names`` (fields of ``cls``) sorted by part, in :data:`PARTS` order; field order within a part."""
    names = list(names)
    return sorted(names, key=lambda n: (_rank(part_of(cls, n)), names.index(n)))


def validators(cls: type) -> list[type]:
    """The classes of config class ``cls`` whose own ``validate`` runs: the parts in :data:`PARTS` order, then the
    composed classes (those without a ``part`` of their own), most basic first."""
    own = [k for k in reversed(cls.__mro__) if "validate" in k.__dict__]
    parts = sorted((k for k in own if "part" in k.__dict__), key=lambda k: _rank(k.part))
    return parts + [k for k in own if "part" not in k.__dict__]


def validate_config(config, world: int | None = None) -> None:
    """Run every part's ``validate()`` on ``config`` (see :func:`validators`); a ``validate`` that takes ``world``
    gets the number of processes (default: :func:`world_size`). Raises the first ConfigError."""
    world = world_size() if world is None else world
    for klass in validators(type(config)):
        check = klass.__dict__["validate"]
        if "world" in inspect.signature(check).parameters:
            check(config, world)
        else:
            check(config)


def world_size() -> int:
    """Processes of this run as ``accelerate launch`` / torchrun announce them (1 when run directly); readable
    before any process group or model exists, so configs can check against it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- the recipe parts: model, data, LoRA, outputs -----------------------------------------------------


@dataclass
class ModelArguments:
    part = "model"

    model_name_or_path: str | None = option(
        None,
        "Model to train: a local HF folder, a Hub id, or `testbed:base` (random tiny model) / `testbed:policy` "
        "(the tiny model after its SFT warm-up), built locally on first use.",
    )
    torch_dtype: str = option("float32", f"Compute dtype, one of {DTYPES} (half: float32 weights, see pure_bf16).")
    pure_bf16: bool = option(False, "Keep a half torch_dtype's weights and updates in it (else float32 weights under "
                                    "autocast; LoRA's frozen base stays half): updates below ~2^-8 of a weight vanish.")
    attn_implementation: str | None = option(None, "Attention kernel passed to from_pretrained (e.g. sdpa, eager).")
    trust_remote_code: bool = option(False, "Allow custom modelling code from the model's repository.")

    def validate(self) -> None:
        from align.modeling import check_model_path

        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path: required (a folder, a Hub id, or testbed:policy)")
        check_model_path(self.model_name_or_path)
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype: must be one of {DTYPES}, got {self.torch_dtype!r}")
        check_attn_implementation(self.attn_implementation)


@dataclass
class LoRAArguments:
    part = "LoRA"

    use_peft: bool = option(False, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = option(None, "Module names to adapt; default: every linear layer.")

    def validate(self) -> None:
        if not self.use_peft:  # a LoRA key without use_peft would silently train every weight instead
            for f in fields(LoRAArguments):
                value = getattr(self, f.name)
                if f.name != "use_peft" and value != getattr(type(self), f.name, f.default):
                    raise ConfigError(f"{f.name}: set to {value!r} but use_peft is false; add use_peft=true to train "
                                      f"a LoRA adapter, or remove {f.name}")
            return
        if self.lora_r < 1:
            raise ConfigError(f"lora_r: must be >= 1 with use_peft, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha: must be > 0 (the adapter's scale is lora_alpha / lora_r), got "
                              f"{self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArguments:
    part = "data"

    dataset_name: str | None = option(
        None,
        "Training data: `testbed:<sft|preference|rl>` (synthetic arithmetic), a local .json/.jsonl/.csv/.parquet "
        "file, a folder (save_to_disk or data files per split), or a Hub dataset id.",
    )
    dataset_config: str | None = option(None, "Hub dataset configuration name.")
    dataset_train_split: str = option("train", "Split used for training.")
    dataset_test_split: str | None = option(None, "Split used for evaluation (none: no eval dataset).")
    eval_dataset_name: str | None = option(None, "Evaluation data, if not dataset_name (same forms as dataset_name).")
    max_train_samples: int | None = option(None, "Use at most this many training rows (testbed default: 1024).")
    max_eval_samples: int | None = option(None, "Use at most this many eval rows (testbed default: 64).")
    testbed_tasks: list[str] = option(list(DEFAULT_TASKS), f"Testbed tasks to mix, from spec 2's {list(TASKS)} or "
                                      f"spec 3's {list(SPEC3_TASKS)} (one spec at a time).")
    testbed_format: str = option("conversational", f"Testbed row format, one of {FORMATS}.")

    def validate(self) -> None:
        from align.data.loading import check_dataset_name

        if not self.dataset_name:
            raise ConfigError("dataset_name: required (e.g. testbed:sft, a local file, or a Hub id)")
        check_dataset_name(self.dataset_name)
        if self.eval_dataset_name:
            check_dataset_name(self.eval_dataset_name, "eval_dataset_name")
        if self.testbed_format not in FORMATS:
            raise ConfigError(f"testbed_format: must be one of {FORMATS}, got {self.testbed_format!r}")
        unknown = [t for t in self.testbed_tasks if t not in TASKS and t not in SPEC3_TASKS]
        if unknown or not self.testbed_tasks:
            raise ConfigError(f"testbed_tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)}; spec 3: "
                              f"{', '.join(SPEC3_TASKS)})" if unknown else "testbed_tasks: at least one task is needed")
        if 0 < sum(t in SPEC3_TASKS for t in self.testbed_tasks) < len(self.testbed_tasks):
            raise ConfigError(f"testbed_tasks: {self.testbed_tasks} mixes spec-2 and spec-3 tasks; name one spec's")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class OutputArguments:
    part = "outputs"

    overwrite_output_dir: bool = option(False, "Allow training into an output_dir that already holds checkpoints.")
    metrics_file: str = option("metrics.jsonl", "File in output_dir that receives every logged metric as JSON lines.")

    def validate(self) -> None:
        check_file_in_dir(self.metrics_file, "metrics_file")


@dataclass
class RecipeArguments(OutputArguments, DataArguments, LoRAArguments, ModelArguments):
    """The parts every recipe shares (model, LoRA, data, outputs). A recipe's config composes them with a trainer
    part (a TRL/transformers TrainingArguments subclass), so :meth:`validate` here holds the checks that need both:
    evaluation against the eval split, the LoRA targets against the model, and output_dir (writable, and against
    resume_from_checkpoint)."""

    recipe_name = "recipe"  # set by each recipe's config class

    def validate(self) -> None:
        if str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no" and not self.dataset_test_split:
            raise ConfigError("eval_strategy: evaluation is on but dataset_test_split is not set")
        if self.use_peft and self.lora_target_modules:
            from align.modeling import check_lora_targets

            check_lora_targets(self.model_name_or_path, self.lora_target_modules, self.trust_remote_code)
        check_writable_dir(self.output_dir or os.path.join("outputs", self.recipe_name))  # check_output_dir's default
        self.check_output_dir()

    def check_output_dir(self) -> None:
        """Default ``output_dir``; resolve ``resume_from_checkpoint`` (true: the newest complete checkpoint, see
        :mod:`align.checkpoints`); protect a folder that holds checkpoints (``overwrite_output_dir``: see
        :meth:`clear_previous_run`)."""
        from align.checkpoints import check_checkpoint, resolve_resume

        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.recipe_name)
        out = self.output_dir
        resume = self.resume_from_checkpoint
        main = os.environ.get("RANK", "0") == "0"  # the process that reports and removes
        if resume and resume.lower() in ("true", "last", "latest"):
            self.resume_from_checkpoint = resolve_resume(out, announce=main)
        elif resume and resume.lower() not in ("false", "none", ""):
            check_checkpoint(resume)
        elif resume:
            self.resume_from_checkpoint = None
        if not os.path.isdir(out) or self.resume_from_checkpoint or self.overwrite_output_dir:
            return  # overwrite: clear_previous_run() removes the old run when training is about to start
        if any(name.startswith("checkpoint-") for name in os.listdir(out)):
            raise ConfigError(
                f"output_dir: {out!r} already holds checkpoints; resume with resume_from_checkpoint=true, "
                "or pass overwrite_output_dir=true, or choose another output_dir"
            )


    def clear_previous_run(self) -> None:
        """``overwrite_output_dir``: :func:`align.checkpoints.clear_previous_run`, called by `align.recipe.start`."""
        clear_previous_run(self)


# --- the parts of every trainer that samples: prompt, generation; and the objective ---------------------


@dataclass
class PromptArguments:
    """How prompt rows become model input, for every recipe that generates from prompts (RL, online, iterative):
    read by :func:`align.data.prompts.load_prompt_data`."""

    part = "prompt"

    prompt_column: str = option("prompt", "Column holding the prompt (a string or messages), e.g. `problem`.")
    system_prompt: str | None = option(None, "System message put before every prompt (then prompts become "
                                             "conversational).")
    prompt_suffix: str = option("", "Text appended to every user prompt (e.g. an answer-format instruction).")


@dataclass
class GenerationArguments:
    """How every trainer that samples (RL, online, iterative) draws completions; a method's part may change a
    default by redefining the field."""

    part = "generation"

    max_prompt_length: int = option(512, "Prompts longer than this (tokens) are rejected before training.")
    max_completion_length: int = option(256, "Max new tokens per completion.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    top_k: int = option(0, "Top-k cut (0: none).")
    generation_batch_size: int = option(64, "Sequences per generate call (hf engine).")

    def validate(self) -> None:
        for key in ("max_prompt_length", "max_completion_length", "generation_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.temperature < float("inf"):
            raise ConfigError(f"temperature: must be > 0 and finite for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0: no cut), got {self.top_k}")


# Objective hyperparameters that are config keys; any other goes in ``objective_kwargs``.
HYPERPARAMETERS = ("beta", "alpha", "eta", "sft_norm", "label_smoothing", "length_alpha")


@dataclass
class ObjectiveArguments:
    """Which objective of the registry (:mod:`align.objectives`) and its hyperparameters, checked once here."""

    part = "objective"

    objective: str = option("dpo", "Objective name (see `align recipes`): dpo, ipo, hinge, robust, rpo, hdpo, "
                                   "lrdpo, ...")
    beta: float = option(0.1, "KL strength β (τ for ipo).")
    alpha: float | None = option(None, "hdpo: entropy coefficient α; scales the policy log-probs (1 = DPO).")
    eta: float | None = option(None, "rpo: weight η of the SFT term.")
    sft_norm: str | None = option(None, "rpo: 'sum' (paper: −η·β·S_θ(y_w)), 'mean' (+η·each answer's "
                                    "token-mean NLL) or 'token' (+η·the batch's token-mean NLL, as TRL).")
    label_smoothing: float | None = option(None, "robust: label flip probability ε in [0, 0.5).")
    length_alpha: float | None = option(None, "lrdpo: weight of the length margin |y_w| − |y_l| (tokens).")
    objective_kwargs: dict = option({}, "Other hyperparameters for objectives added later, as a mapping.")

    def objective_params(self) -> dict:
        """The hyperparameters to pass to the objective; errors if one is set that it does not take."""
        from align.objectives import check_params, registry

        spec = registry().get(self.objective)
        takes = spec.params if spec else {}
        params = {}
        for key in HYPERPARAMETERS:
            value = getattr(self, key)
            if value is None:
                continue
            if key not in takes:
                if key == "beta":
                    continue  # every DPO-style objective has β; tolerate its default for any that does not
                raise ConfigError(f"{key}: objective {self.objective!r} does not take it (takes: {', '.join(takes)})")
            params[key] = value
        params.update(self.objective_kwargs)
        check_params(self.objective, params)
        return params

    def validate(self) -> None:
        self.objective_params()


# --- the trainer part ----------------------------------------------------------------------------------


@dataclass
class CPUSaneDefaults(HubArguments):
    """The trainer part: the TRL/transformers training arguments a recipe config extends, with defaults that
    differ from TRL's: fp32 and no gradient checkpointing (bf16 is ~20x slower on a CPU and checkpointing costs
    ~40%), no external loggers, readable logging on tiny runs. A config lists this before the TRL config so these
    win over its defaults; it is always composed with a TrainingArguments subclass, whose keys it checks."""

    part = "trainer"

    bf16: bool | None = option(False, "Train in bfloat16 mixed precision (fast on recent GPUs, slow on CPUs).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    report_to: str | list[str] | None = option("none", "Loggers to report to (wandb, tensorboard, trackio, ...).")
    logging_steps: float = option(10.0, "Log every this many optimizer steps.")
    dataloader_pin_memory: bool = option(False, "Pin host memory in data loaders (helps GPU input, costs on CPU).")
    logits_block_size: int | Literal["auto"] = option(
        "auto", "Tokens per block through the output head and log-softmax, never the full [batch, tokens, vocab] "
                "logits (docs/architecture.md); auto = up to 512 tokens and 2**25 logits (128 MiB fp32) a block, "
                "0 = off; at most the longest sequence (max_length, or max_prompt_length + max_completion_length).")
    padding_free: bool = option(False, "Forwards without padding: sequences packed with position_ids restarting per "
                                       "sequence, in one row (flash-attention) or rows of the longest (sdpa, eager, "
                                       "flex); docs/architecture.md.")
    max_tokens_per_micro_batch: int = option(16384, "Token budget (padded length x sequences) of each forward of "
                                                    "the no-gradient log-prob passes: the DPO-family reference "
                                                    "precompute and the RL old / reference log-probs.")
    ddp_find_unused_parameters: bool | None = option(
        False, "DDP: look for parameters without gradients each step (costly; every recipe here uses all of them).")
    use_cpu: bool = field(
        default_factory=lambda: not has_accelerator() and not deepspeed_on_cpu(),
        metadata={"help": "Train on the CPU (default: true exactly when no GPU is present; several CPU processes "
                          "under accelerate launch then use torch.distributed with gloo). A DeepSpeed launch without "
                          "a GPU defaults to false with ddp_backend gloo: DeepSpeed runs on its CPU accelerator."},
    )

    @classmethod
    def precheck(cls, values: dict) -> None:
        """Checks on the raw values, before transformers' own ``__post_init__`` reports them less clearly."""
        apply_master_weights(values)  # torch_dtype bfloat16: float32 weights, bf16 autocast (unless pure_bf16)
        apply_deepspeed_on_cpu(values)  # a DeepSpeed launch without a GPU: DeepSpeed's engine on the CPU, gloo
        if values.get("fp16") and values.get("bf16"):
            raise ConfigError("fp16 / bf16: choose at most one")
        if values.get("fp16") and not has_accelerator():
            raise ConfigError("fp16: needs a GPU; on the CPU use the default fp32 (or bf16=true)")
        apply_rules(values, STEP_RULES)

    def validate(self) -> None:
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "max_tokens_per_micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        apply_rules(self, TRAINER_RULES)
        check_logits_block_size(self)
        check_padding_free(self)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("max_steps / num_train_epochs: one of them must be > 0")
        if self.load_best_model_at_end and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            raise ConfigError("load_best_model_at_end: needs evaluation to pick the best checkpoint; set eval_strategy "
                              "(steps or epoch, matching save_strategy) and dataset_test_split, or remove it")
        check_report_to(self.report_to)
        check_launch(self)  # the launcher's FSDP / DeepSpeed against this run (align/sharding.py)
