"""Arguments every recipe shares: the model, the data, LoRA, and CPU-sane training defaults.

A recipe's config is one flat dataclass: ``@dataclass class MyConfig(RecipeArguments, trl.XConfig)``.
Fields here come first in ``--help``; the TRL/transformers training arguments follow. ``validate()``
runs right after construction (see :func:`align.config.load_config`) and checks, before any model or
dataset is loaded, every combination that cannot work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from align.errors import ConfigError
from align.testbed.tasks import DEFAULT_TASKS, FORMATS, TASKS

DTYPES = ("float32", "bfloat16", "float16", "auto")


def _f(default, help_: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_}, **kw)
    return field(default=default, metadata={"help": help_}, **kw)


@dataclass
class RecipeArguments:
    # --- model ---
    model_name_or_path: str | None = _f(
        None,
        "Model to train: a local HF folder, a Hub id, or `testbed:base` (random tiny model) / `testbed:policy` "
        "(the tiny model after its SFT warm-up), built locally on first use.",
    )
    torch_dtype: str = _f("float32", f"Weights dtype when loading the model, one of {DTYPES}.")
    attn_implementation: str | None = _f(None, "Attention kernel passed to from_pretrained (e.g. sdpa, eager).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model's repository.")
    # --- LoRA ---
    use_peft: bool = _f(False, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = _f(None, "Module names to adapt; default: every linear layer.")
    # --- data ---
    dataset_name: str | None = _f(
        None,
        "Training data: `testbed:<sft|preference|rl>` (synthetic arithmetic), a local .json/.jsonl/.csv/.parquet "
        "file, a folder (save_to_disk or data files per split), or a Hub dataset id.",
    )
    dataset_config: str | None = _f(None, "Hub dataset configuration name.")
    dataset_train_split: str = _f("train", "Split used for training.")
    dataset_test_split: str | None = _f(None, "Split used for evaluation (none: no eval dataset).")
    eval_dataset_name: str | None = _f(None, "Evaluation data, if not dataset_name (same forms as dataset_name).")
    max_train_samples: int | None = _f(None, "Use at most this many training rows (testbed default: 1024).")
    max_eval_samples: int | None = _f(None, "Use at most this many eval rows (testbed default: 64).")
    testbed_tasks: list[str] = _f(list(DEFAULT_TASKS), f"Testbed tasks to mix, from {list(TASKS)}.")
    testbed_format: str = _f("conversational", f"Testbed row format, one of {FORMATS}.")
    # --- outputs ---
    overwrite_output_dir: bool = _f(False, "Allow training into an output_dir that already holds checkpoints.")
    metrics_file: str = _f("metrics.jsonl", "File in output_dir that receives every logged metric as JSON lines.")

    recipe_name = "recipe"  # set by each recipe's config class

    @classmethod
    def precheck(cls, values: dict) -> None:
        """Checks on the raw values, before transformers' own ``__post_init__`` reports them less clearly."""
        if values.get("fp16") and values.get("bf16"):
            raise ConfigError("fp16 / bf16: choose at most one")
        if values.get("fp16") and not _has_accelerator():
            raise ConfigError("fp16: needs a GPU; on the CPU use the default fp32 (or bf16=true)")

    def validate(self) -> None:
        """Raise ConfigError on any impossible setting; touches no model and no dataset."""
        from align.data.loading import check_dataset_name
        from align.modeling import check_model_path

        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path: required (a folder, a Hub id, or testbed:policy)")
        check_model_path(self.model_name_or_path)
        if getattr(self, "ref_model_name_or_path", None):  # recipes with a separate reference model
            check_model_path(self.ref_model_name_or_path, "ref_model_name_or_path")
        if not self.dataset_name:
            raise ConfigError("dataset_name: required (e.g. testbed:sft, a local file, or a Hub id)")
        check_dataset_name(self.dataset_name)
        if self.eval_dataset_name:
            check_dataset_name(self.eval_dataset_name, "eval_dataset_name")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype: must be one of {DTYPES}, got {self.torch_dtype!r}")
        if self.testbed_format not in FORMATS:
            raise ConfigError(f"testbed_format: must be one of {FORMATS}, got {self.testbed_format!r}")
        unknown = [t for t in self.testbed_tasks if t not in TASKS]
        if unknown or not self.testbed_tasks:
            raise ConfigError(f"testbed_tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})" if unknown
                              else "testbed_tasks: at least one task is needed")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.use_peft and self.lora_r < 1:
            raise ConfigError(f"lora_r: must be >= 1 with use_peft, got {self.lora_r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("max_steps / num_train_epochs: one of them must be > 0")
        if str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no" and not self.dataset_test_split:
            raise ConfigError("eval_strategy: evaluation is on but dataset_test_split is not set")
        self._check_output_dir()

    def _check_output_dir(self) -> None:
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.recipe_name)
        out = self.output_dir
        resume = self.resume_from_checkpoint
        if resume and resume.lower() in ("true", "last", "latest"):
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(out) if os.path.isdir(out) else None
            if last is None:
                raise ConfigError(f"resume_from_checkpoint: no checkpoint-* folder in output_dir {out!r}")
            self.resume_from_checkpoint = last
        elif resume and resume.lower() not in ("false", "none", "") and not os.path.isdir(resume):
            raise ConfigError(f"resume_from_checkpoint: folder {resume!r} does not exist")
        elif resume:
            self.resume_from_checkpoint = None
        if not os.path.isdir(out) or self.resume_from_checkpoint or self.overwrite_output_dir:
            return
        if any(name.startswith("checkpoint-") for name in os.listdir(out)):
            raise ConfigError(
                f"output_dir: {out!r} already holds checkpoints; resume with resume_from_checkpoint=true, "
                "or pass overwrite_output_dir=true, or choose another output_dir"
            )


@dataclass
class PromptArguments:
    """How prompt rows become model input, for every recipe that generates from prompts (RL, online, iterative):
    read by :func:`align.data.prompts.load_prompt_data`."""

    prompt_column: str = _f("prompt", "Column holding the prompt (a string or messages), e.g. `problem`.")
    system_prompt: str | None = _f(None, "System message put before every prompt (then prompts become "
                                         "conversational).")
    prompt_suffix: str = _f("", "Text appended to every user prompt (e.g. an answer-format instruction).")


def world_size() -> int:
    """Processes of this run as ``accelerate launch`` / torchrun announce them (1 when run directly); readable
    before any process group or model exists, so configs can check against it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class CPUSaneDefaults:
    """Defaults that differ from TRL's: fp32 and no gradient checkpointing (bf16 is ~20x slower on a
    CPU and checkpointing costs ~40%), no external loggers, readable logging on tiny runs. A recipe config
    lists this mixin before the TRL config so these win over the TRL config's own defaults."""

    bf16: bool | None = _f(False, "Train in bfloat16 mixed precision (fast on recent GPUs, slow on CPUs).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    report_to: str | list[str] | None = _f("none", "Loggers to report to (wandb, tensorboard, trackio, ...).")
    logging_steps: float = _f(10.0, "Log every this many optimizer steps.")
    dataloader_pin_memory: bool = _f(False, "Pin host memory in data loaders (helps GPU input, costs on CPU).")
    ddp_find_unused_parameters: bool | None = _f(
        False, "DDP: look for parameters without gradients each step (costly; every recipe here uses all of them).")
    use_cpu: bool = field(
        default_factory=lambda: not _has_accelerator(),
        metadata={"help": "Train on the CPU (default: true exactly when no GPU is present; several CPU processes "
                          "under accelerate launch then use torch.distributed with gloo)."},
    )
