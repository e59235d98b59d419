"""Value checks the config parts of :mod:`align.args` share: the trainer part's numbers (learning rate, optimizer,
steps, seeds), its loggers, the attention kernel, and whether ``output_dir`` can be written.

Each raises a one-line :class:`~align.errors.ConfigError` naming the key, before any model or dataset is loaded.
NaN never gets here: :func:`align.config.load_config` refuses it for every key.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from align.errors import ConfigError

SEED_LIMIT = 2**32  # numpy's seeds are below this


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


# key -> (the values it may take, what the message says they are). None means "unset" where the key allows it.
TRAINER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0 (0 would never change the weights)"),
    "max_grad_norm": (lambda v: v is None or v >= 0, ">= 0 (0 or null: no clipping)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "num_train_epochs": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "max_steps": (lambda v: v >= -1, ">= -1 (-1: train num_train_epochs instead)"),
    "seed": (lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**32)"),
    "data_seed": (lambda v: v is None or 0 <= v < SEED_LIMIT, "in [0, 2**32) or null"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
    "logits_block_size": (lambda v: v == "auto" or v >= 0, ">= 0 (0 = off) or auto"),
}
# Checked on the raw values, before transformers' __post_init__ reports them less clearly (a negative warmup_steps
# is "warmup_steps must be an integer or a float" there).
STEP_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "warmup_steps": (lambda v: _finite(v) and v >= 0, ">= 0 (below 1: a fraction of the training steps)"),
    "logging_steps": (lambda v: _finite(v) and v > 0, "> 0 (below 1: a fraction of the training steps)"),
    "save_steps": (lambda v: _finite(v) and v > 0, "> 0 (below 1: a fraction of the training steps)"),
    "eval_steps": (lambda v: v is None or (_finite(v) and v > 0), "> 0 (below 1: a fraction of the training "
                                                                   "steps), or null: logging_steps"),
}


def apply_rules(values: Mapping[str, Any] | object, rules: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Each rule's key present in ``values`` (a mapping, or an object's attributes) must satisfy it."""
    for key, (ok, what) in rules.items():
        if isinstance(values, Mapping):
            if key not in values:
                continue
            value = values[key]
        elif hasattr(values, key):
            value = getattr(values, key)
        else:
            continue
        if not ok(value):
            raise ConfigError(f"{key}: must be {what}, got {value}")


def check_report_to(report_to) -> None:
    """Every logger named is one transformers knows and one that is installed (else Trainer fails after the model
    has loaded); the message says how to install it (align's trackers: :func:`align.tracking.install_command`)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    from align.tracking import PINS, install_command, is_installed

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"report_to: unknown logger {name!r} (known: {', '.join(INTEGRATION_TO_CALLBACK)}, "
                              "none, all)")
        if not (is_installed(name) if name in PINS else name in get_available_reporting_integrations()):
            raise ConfigError(f"report_to: {name!r} is not installed ({install_command(name)}), or use "
                              "report_to=none")


# Attention implementations that keep sequences packed into one row apart by their restarting ``position_ids`` alone
# (``padding_free``): transformers builds a block-diagonal causal mask for sdpa / eager / flex
# (masking_utils.find_packed_sequence_indices, used when there is no attention mask) and flash-attention runs its
# variable-length kernel on a single packed row.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def packed_attention(impl: str | None) -> str | None:
    """The implementation transformers runs for ``impl``: it drops the ``paged|`` prefix of every kernel but eager."""
    return impl.removeprefix("paged|") if impl and impl != "paged|eager" else impl


def longest_sequence(config) -> tuple[int, str] | None:
    """The longest sequence (tokens) ``config`` lets a run score, and the keys that say so: its ``max_length``, or
    ``max_prompt_length + max_completion_length`` (the larger where a config has both); None if nothing bounds it."""
    found = []
    if getattr(config, "max_length", None) is not None:
        found.append((config.max_length, f"max_length {config.max_length}"))
    prompt, completion = getattr(config, "max_prompt_length", None), getattr(config, "max_completion_length", None)
    if prompt is not None and completion is not None:
        found.append((prompt + completion, f"max_prompt_length {prompt} + max_completion_length {completion}"))
    return max(found, key=lambda f: f[0]) if found else None


def check_logits_block_size(config) -> None:
    """An explicit ``logits_block_size`` no larger than the longest sequence the config allows (``auto``, the
    default, sizes its blocks by the vocabulary and is one block when a pass scores fewer tokens: never refused)."""
    value = config.logits_block_size
    longest = longest_sequence(config)
    if value != "auto" and longest is not None and value > longest[0]:
        raise ConfigError(f"logits_block_size: {value} is larger than the longest sequence, {longest[0]} tokens "
                          f"({longest[1]}); use at most {longest[0]}, auto or 0 (off)")


def check_padding_free(config) -> None:
    """``padding_free`` with an ``attn_implementation`` that keeps packed sequences apart (the model's own default,
    when the key is unset, is checked once the model is loaded: :func:`align.logps.check_packable`)."""
    impl = getattr(config, "attn_implementation", None)
    if getattr(config, "padding_free", False) and impl is not None and packed_attention(impl) not in PACKED_ATTENTION:
        raise ConfigError(f"padding_free: attn_implementation {impl!r} cannot keep packed sequences apart (supported: "
                          f"{', '.join(PACKED_ATTENTION)}); use one of them, or padding_free=false")


def check_attn_implementation(name: str | None) -> None:
    """A kernel transformers has registered (or ``eager``), a ``paged|`` form of one, or a Hub kernel repo."""
    if name is None or "/" in name:
        return
    from transformers import AttentionInterface

    known = ("eager", *AttentionInterface().valid_keys())
    if name not in known and not (name.startswith("paged|") and name[len("paged|"):] in known):
        raise ConfigError(f"attn_implementation: must be one of {', '.join(known)}, or a Hub kernel repo "
                          f"(org/name), got {name!r}")


def check_writable_dir(path: str, key: str = "output_dir") -> None:
    """``path`` is a folder, or can be created as one, and files can be written there: the nearest existing folder on
    the way gets a probe folder made and removed (``os.access`` says yes to root even where nothing can be made)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: {path!r} cannot be created, {existing!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".align-write-check-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{key}: {path!r} is not writable (cannot create folders in {existing!r}: "
                          f"{err.strerror})") from None


def check_file_in_dir(name: str, key: str, folder_key: str = "output_dir") -> None:
    """``name`` is a relative file path that stays inside its folder (no absolute path, no ``..`` out of it)."""
    norm = os.path.normpath(name) if name else ""
    if not name or os.path.isabs(name) or norm in (".", "") or norm.split(os.sep)[0] == ".." or name.endswith(
            ("/", os.sep)):
        raise ConfigError(f"{key}: must be a file name inside {folder_key} (e.g. metrics.jsonl), got {name!r}")


def check_even_batches(rows: int, config, world: int) -> None:
    """Several processes and a train set that the processes' batch does not divide: accelerate fills the epoch's last
    batch with rows repeated from the start (``even_batches``), so the last step trains on other rows than one process
    with the same global batch would (which trains on the remainder alone): a one-line ConfigError, unless
    ``dataloader_drop_last`` or ``max_steps`` ends the run before that batch."""
    per = config.per_device_train_batch_size
    step = per * world
    if world <= 1 or rows % step == 0 or getattr(config, "dataloader_drop_last", False):
        return
    max_steps = getattr(config, "max_steps", -1)
    if max_steps > 0 and max_steps * config.gradient_accumulation_steps <= rows // step:
        return  # the run stops before the epoch's last batch
    raise ConfigError(f"per_device_train_batch_size: {per} x processes {world} = {step} rows a batch does not divide "
                      f"the {rows} train rows, so accelerate would fill the last batch with {step - rows % step} rows "
                      f"repeated from the start (one process trains on the {rows % step} left); set "
                      f"dataloader_drop_last: true, or max_train_samples: {rows - rows % step}")
