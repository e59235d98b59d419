"""Loading models and tokenizers: local folders, Hub ids, and the embedded testbed (``testbed:...``)."""

from __future__ import annotations

import os
import re

from align.errors import ConfigError

TESTBED_PREFIX = "testbed:"
TESTBED_MODELS = ("base", "policy")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_path(name: str, key: str = "model_name_or_path") -> None:
    """Fail early with a one-line ConfigError if ``name`` cannot be a loadable model."""
    if name.startswith(TESTBED_PREFIX):
        which = name[len(TESTBED_PREFIX):]
        if which not in TESTBED_MODELS:
            raise ConfigError(f"{key}: unknown testbed model {name!r} (use testbed:base or testbed:policy)")
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"{key}: folder {name!r} has no config.json, so it is not a model folder")
        return
    local_looking = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if local_looking or not _HUB_ID.match(name):
        raise ConfigError(f"{key}: folder {name!r} does not exist")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                f"{key}: {name!r} is not a local folder and not in the Hub cache, and HF_HUB_OFFLINE is set"
            )


def resolve_model_path(name: str) -> str:
    """The folder or Hub id to pass to ``from_pretrained`` (building the testbed when it is asked for)."""
    if name.startswith(TESTBED_PREFIX):
        from align.testbed.build import ensure_testbed

        return str(getattr(ensure_testbed(), name[len(TESTBED_PREFIX):]))
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, torch_dtype: str = "float32", attn_implementation=None, trust_remote_code=False):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)


def load_policy_and_reference(config, want_reference: bool = True):
    """The policy from ``model_name_or_path`` and, when ``ref_model_name_or_path`` is set (and wanted), a separate
    reference, both with the config's dtype, attention implementation and ``trust_remote_code``; else ``None``
    (the trainer then uses a frozen copy, the adapter-off base model, or precomputed log-probs)."""
    load = dict(torch_dtype=config.torch_dtype, attn_implementation=config.attn_implementation,
                trust_remote_code=config.trust_remote_code)
    model = load_model(config.model_name_or_path, **load)
    named = want_reference and config.ref_model_name_or_path
    return model, (load_model(config.ref_model_name_or_path, **load) if named else None)


def lora_config(args):
    """The peft ``LoraConfig`` for ``args`` (a RecipeArguments), or None when ``use_peft`` is off."""
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
