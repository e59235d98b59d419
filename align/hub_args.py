"""The Hub keys of every recipe config (part of the trainer part, :class:`align.args.CPUSaneDefaults`), and their
checks, all before any model loads.

transformers' TrainingArguments already has ``push_to_hub``, ``hub_model_id``, ``hub_private_repo``,
``hub_revision``, ``hub_strategy`` and ``hub_token``: the fields are reused with align's defaults and help, but
transformers' Trainer never acts on them (:mod:`align.trainers.hub_sync`); align pushes itself
(:func:`align.hub.push_run`). ``push_merged`` is align's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from align.errors import ConfigError

STRATEGIES = ("end", "every_save")
# A branch name git and the Hub accept (no spaces, no "..", no leading "-" or "/", no trailing "/" or ".lock").
BRANCH = re.compile(r"^(?!-)(?!/)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]+(?<!/)(?<!\.lock)$")


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def is_secret(key: str) -> bool:
    """Whether config key ``key`` holds a secret (``hub_token``, ``*_api_key``, ``*secret*``, ``*password*``): never
    saved in ``align_config.yaml``, a card, or a push. A tokenizer's special tokens (``pad_token``...) are not."""
    k = key.lower()
    if any(word in k for word in ("api_key", "apikey", "secret", "password")):
        return True
    return (k == "token" or k.endswith("_token")) and k not in SPECIAL_TOKENS


def public_config(values: dict) -> dict:
    """``values`` (a config as a mapping) without its secret keys."""
    return {k: v for k, v in values.items() if not is_secret(k)}


def _key(default, help_: str):
    return field(default=default, metadata={"help": help_})


def check_repo_id(repo_id: str, key: str = "hub_model_id") -> None:
    """``repo_id`` is a repository id huggingface_hub accepts (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = " ".join(str(err).split()).split(":")[0]
        raise ConfigError(f"{key}: {repo_id!r} is not a valid Hub repository id ({reason})") from None


def check_revision(revision: str, key: str = "hub_revision") -> None:
    if not BRANCH.match(revision):
        raise ConfigError(f"{key}: {revision!r} is not a valid branch name (letters, digits, '.', '_', '-', '/'; "
                          "no '..', no leading '-' or '/')")


def check_strategy(value) -> None:
    value = getattr(value, "value", value)
    if value not in STRATEGIES:
        raise ConfigError(f"hub_strategy: must be one of {STRATEGIES} (end: push once, after the run; every_save: "
                          f"also upload each checkpoint in the background), got {value!r}")


@dataclass
class HubArguments:
    """``push_to_hub`` and its keys; composed into the trainer part of every recipe config."""

    part = "trainer"

    push_to_hub: bool = _key(False, "At the end of the run, push the final model, tokenizer, config, metrics, plots "
                                    "and card to the Hub repository hub_model_id (docs/hub.md).")
    hub_model_id: str | None = _key(None, "Hub repository to push to: name or namespace/name.")
    hub_private_repo: bool | None = _key(None, "Create the repository private (null: the Hub's default).")
    hub_revision: str | None = _key(None, "Branch to push to, created from main when missing (null: main).")
    hub_strategy: str = _key("end", "end: push once, after the final save and evaluation; every_save: also upload "
                                    "each checkpoint, in the background.")
    hub_token: str | None = _key(None, "Hub token (default: $HF_TOKEN or `hf auth login`); never saved in "
                                       "align_config.yaml, a card, or a push.")
    push_merged: bool = _key(False, "LoRA: also push the adapter merged into the base model, in the repository's "
                                    "merged/ folder (written to output_dir/merged first).")

    def __post_init__(self):
        check_strategy(self.hub_strategy)  # before transformers turns it into its enum (4 strategies, ours: 2)
        post_init = getattr(super(), "__post_init__", None)
        if post_init is not None:
            post_init()

    def __getstate__(self) -> dict:
        """A pickled config (transformers' ``training_args.bin``, in the output folder and every checkpoint) keeps no
        secret: ``hub_token`` and any other secret key are saved as None."""
        return {k: None if is_secret(k) else v for k, v in self.__dict__.items()}

    def validate(self) -> None:
        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id)
        if self.hub_revision is not None:
            check_revision(self.hub_revision)
        if self.push_merged and not getattr(self, "use_peft", False):
            raise ConfigError("push_merged: needs use_peft=true (only a LoRA adapter has a merged copy to push)")
        if not self.push_to_hub:
            for key, unset in (("push_merged", False), ("hub_strategy", "end"), ("hub_revision", None),
                               ("hub_private_repo", None)):
                value = getattr(getattr(self, key), "value", getattr(self, key))
                if value != unset:
                    raise ConfigError(f"{key}: set to {value!r} but push_to_hub is false; add push_to_hub=true, or "
                                      f"remove {key}")
        elif not self.hub_model_id:
            raise ConfigError("push_to_hub: needs hub_model_id, the Hub repository to push to (e.g. "
                              "your-name/qwen-dpo)")


def check_iterative(config) -> None:
    """The Hub keys of the iterative driver: ``push_every_iteration`` needs ``push_to_hub``; its rounds' checkpoints
    are not pushed (``every_save``), and its iterations are saved merged already (``push_merged``)."""
    if config.push_every_iteration and not config.push_to_hub:
        raise ConfigError("push_every_iteration: set to True but push_to_hub is false; add push_to_hub=true, or "
                          "remove push_every_iteration")
    if getattr(config.hub_strategy, "value", config.hub_strategy) == "every_save":
        raise ConfigError("hub_strategy: every_save uploads a trainer's checkpoints; the iterative driver pushes "
                          "iterations instead: use push_every_iteration=true")
    if config.push_merged:
        raise ConfigError("push_merged: the iterative driver saves every iteration merged already (iter-<t>/); "
                          "remove push_merged")
