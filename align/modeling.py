"""Loading models and tokenizers: local folders, Hub ids, and names a plugin owns (``testbed:base``, ...).

A name ``<prefix>:<rest>`` whose prefix a plugin registered (:func:`register_model_source`) is checked and
resolved by that plugin. The plugins that own a prefix are listed by module in :data:`PLUGINS` and imported on the
first name that uses it, like entry points: this module never imports them, so they may use the whole library.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from align.errors import ConfigError
from align.precision import warn_vanishing_updates, weights_dtype
from align.sharding import share_rank0_weights

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Name prefix -> the module that registers it (its model and dataset sources) when imported.
PLUGINS = {"testbed": "align.testbed.plugin"}


@dataclass(frozen=True)
class ModelSource:
    """How a plugin's model names ``<prefix>:<rest>`` are checked and resolved: ``check(name, rest, key)`` raises a
    one-line :class:`ConfigError` naming ``key``; ``resolve(rest)`` returns the folder to load (building it first
    when needed)."""

    check: Callable[[str, str, str], None]
    resolve: Callable[[str], str]


MODEL_SOURCES: dict[str, ModelSource] = {}


def register_model_source(prefix: str, source: ModelSource) -> None:
    """Let model names ``<prefix>:...`` be checked and resolved by ``source``."""
    MODEL_SOURCES[prefix] = source


def find_source(sources: dict, name: str):
    """``(source, rest)`` when ``name`` is ``<prefix>:<rest>`` with a prefix in ``sources`` (importing the plugin
    that owns the prefix on first use), else ``None``: the name is an ordinary path or Hub id."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None
    if prefix not in sources and prefix in PLUGINS:
        importlib.import_module(PLUGINS[prefix])
    source = sources.get(prefix)
    return None if source is None else (source, rest)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_path(name: str, key: str = "model_name_or_path") -> None:
    """Fail early with a one-line ConfigError if ``name`` cannot be a loadable model."""
    found = find_source(MODEL_SOURCES, name)
    if found is not None:
        source, rest = found
        source.check(name, rest, key)
        return
    if os.path.isdir(name):
        from align.model_files import check_model_folder

        check_model_folder(name, key)
        return
    local_looking = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if local_looking or not HUB_ID.match(name):
        raise ConfigError(f"{key}: folder {name!r} does not exist")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                f"{key}: {name!r} is not a local folder and not in the Hub cache, and HF_HUB_OFFLINE is set"
            )


def resolve_model_path(name: str) -> str:
    """The folder or Hub id to pass to ``from_pretrained`` (a plugin's name resolved by its plugin)."""
    found = find_source(MODEL_SOURCES, name)
    if found is not None:
        source, rest = found
        return source.resolve(rest)
    return name


def load_failed(key: str, what: str, path: str, err: BaseException) -> ConfigError:
    """The one-line error for a model or tokenizer that ``from_pretrained`` could not load (what the file checks of
    :mod:`align.model_files` cannot see, e.g. tensors of the wrong shape or a broken tokenizer.json)."""
    reason = " ".join(str(err).split())
    return ConfigError(f"{key}: cannot load the {what} from {path!r} ({type(err).__name__}: {reason[:300]})")


def load_tokenizer(name: str, trust_remote_code: bool = False, key: str = "model_name_or_path"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise load_failed(key, "tokenizer", path, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_token_id(tokenizer, fallback: int | None = None) -> int:
    """The id that pads batches: the tokenizer's pad token, else ``fallback`` (e.g. the model's first EOS id), else its
    EOS token (a tokenizer given directly, not through :func:`load_tokenizer`, may have no pad token)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return fallback if fallback is not None else tokenizer.eos_token_id


def require_chat_template(tokenizer, what: str, key: str = "model_name_or_path") -> None:
    """Conversational data (``what``: e.g. "the train dataset") needs the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise ConfigError(f"{key}: the tokenizer of {tokenizer.name_or_path!r} has no chat template, and {what} is "
                      "conversational (lists of messages); use a chat model, add a chat_template.jinja to its folder, "
                      "or give standard (string) rows")


def load_model(name: str, torch_dtype: str = "float32", attn_implementation=None, trust_remote_code=False,
               key: str = "model_name_or_path"):
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as err:
        raise load_failed(key, "model", path, err) from None
    return share_rank0_weights(model)  # FSDP's RAM-efficient loading left zeros outside local rank 0


def process_device():
    """This process's device: what accelerate gave it (its local rank's GPU under ``accelerate launch``, the CPU with
    ``use_cpu``), from the state the run's TrainingArguments made; the GPU or the CPU when there is none yet."""
    from accelerate import PartialState

    return PartialState().device


def frozen_dtype():
    """The dtype a frozen model loaded outside the trainer (a reward model, a judge) is read in: bfloat16 when this
    process's device is a GPU that computes in it (half the memory of float32, on every process), else None (the
    checkpoint's default, float32 on the CPU)."""
    import torch

    device = process_device()
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def load_frozen(cls, path: str, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` for a frozen model loaded outside the trainer (a reward model, a
    judge): whole in every process even under ZeRO-3 (:func:`align.zero3.loading_whole`), where transformers would
    partition it like the policy (:func:`place_frozen` then puts it on this process's device)."""
    from align.zero3 import loading_whole

    with loading_whole():
        return cls.from_pretrained(path, **kwargs)


def place_frozen(model):
    """A frozen model loaded outside the trainer (a reward model, a pairwise judge): rank 0's weights in every
    process (:func:`align.sharding.share_rank0_weights`), no gradients, eval mode, on :func:`process_device`."""
    return share_rank0_weights(model).requires_grad_(False).eval().to(process_device())


def check_lora_targets(name: str, targets: list[str], trust_remote_code: bool = False,
                       key: str = "lora_target_modules") -> None:
    """Every LoRA target names a layer of model ``name`` that LoRA can adapt (peft's rule: the module's name or its
    last dotted parts), checked on the model built on the meta device, with no weights read. peft itself only
    complains when no target matches at all, after the model has loaded."""
    if list(targets) == ["all-linear"]:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError):
        return  # loading the model reports what is wrong with it
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    layers = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in layers):
            names = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
            raise ConfigError(f"{key}: {target!r} matches no layer of {name!r} that LoRA can adapt (layer names: "
                              f"{names})")


def load_policy_and_reference(config, want_reference: bool = True):
    """The policy from ``model_name_or_path`` and, when ``ref_model_name_or_path`` is set (and wanted), a separate
    reference, both in the weights dtype (:func:`align.precision.weights_dtype`: float32 master weights for a half
    ``torch_dtype`` unless ``pure_bf16`` or LoRA; a warning when the learning rate is too small for half weights),
    with the config's attention implementation and ``trust_remote_code``; else ``None`` (the trainer then uses a
    frozen copy, the adapter-off base model, or precomputed log-probs)."""
    load = dict(torch_dtype=weights_dtype(config), attn_implementation=config.attn_implementation,
                trust_remote_code=config.trust_remote_code)
    model = load_model(config.model_name_or_path, **load)
    warn_vanishing_updates(model, config, is_main=os.environ.get("RANK", "0") == "0")
    named = want_reference and config.ref_model_name_or_path
    return model, (load_model(config.ref_model_name_or_path, **load, key="ref_model_name_or_path") if named else None)


def lora_config(args):
    """The peft ``LoraConfig`` for ``args`` (a RecipeArguments), or None when ``use_peft`` is off."""
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules if args.lora_target_modules not in (None, [], ["all-linear"])
        else "all-linear",
        task_type="CAUSAL_LM",
    )
