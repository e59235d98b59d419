"""What a run's model card knows beyond its config and result: the command that reproduces it, the compute, the
data with row counts, the framework versions (:func:`run_info`); and how secrets are kept out of all of them
(:func:`redact_argv`, :func:`scrub`; which config keys are secrets: :func:`align.hub_args.is_secret`)."""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from align.args import world_size
from align.hub_args import is_secret
from align.io import read_records

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "ALIGN_SERVE_API_KEY")
HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")  # a Hugging Face access token, wherever it appears
REDACTED = "<redacted>"
PACKAGES = {"TRL": "trl", "Transformers": "transformers", "PyTorch": "torch", "PEFT": "peft",
            "Accelerate": "accelerate", "Datasets": "datasets", "Tokenizers": "tokenizers"}


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (a recipe's command line) without the overrides of secret keys, in any of the forms
    :func:`align.config.parse_overrides` reads (``key=v``, ``--key=v``, ``--key v``)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key, eq, _ = tok[2:].partition("=")
            takes_next = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if is_secret(key.replace("-", "_")):
                i += 2 if takes_next else 1
                continue
            out.append(tok)
            if takes_next:
                out.append(argv[i + 1])
            i += 2 if takes_next else 1
            continue
        if not is_secret(tok.partition("=")[0]):
            out.append(tok)
        i += 1
    return out


def reproduce_command(recipe: str, argv: Sequence[str]) -> str:
    """``align train <recipe> <argv>`` as a shell line, secrets left out."""
    return shlex.join(["align", "train", recipe, *redact_argv(argv)])


def secret_values(config=None) -> list[str]:
    """The secrets this run could leak: its config's secret values and the secret environment variables."""
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    if config is not None:
        values += [str(getattr(config, k)) for k in vars(config) if is_secret(k) and getattr(config, k)]
    return [v for v in values if len(v) >= 8]


def scrub(text: str, config=None) -> str:
    """``text`` with every secret value of :func:`secret_values` and every Hugging Face token replaced."""
    for value in secret_values(config):
        text = text.replace(value, REDACTED)
    return HF_TOKEN.sub(REDACTED, text)


def precision(config) -> str:
    mixed = "bf16 mixed precision" if getattr(config, "bf16", False) else \
        "fp16 mixed precision" if getattr(config, "fp16", False) else "fp32"
    return f"{mixed}, weights loaded as {config.torch_dtype}"


def device(config) -> str:
    import torch

    if not getattr(config, "use_cpu", True) and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU per process"
    return "CPU"


def versions() -> dict[str, str]:
    from align import __version__

    found = {"align": __version__}
    for name, package in PACKAGES.items():
        try:
            found[name] = version(package)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def datasets_of(config, rows: dict) -> list[dict]:
    """The train (and eval) data: name, split, and the rows the trainer used (``rows`` from the recipe's result)."""
    unit = "packed sequences" if getattr(config, "packing", False) else "rows"
    found = [{"role": "train", "name": config.dataset_name, "split": config.dataset_train_split,
              "rows": rows.get("train"), "unit": unit}]
    if config.dataset_test_split:
        found.append({"role": "eval", "name": config.eval_dataset_name or config.dataset_name,
                      "split": config.dataset_test_split, "rows": rows.get("eval"), "unit": unit})
    return found


def tokens_seen(config) -> int | None:
    """Tokens trained on, when the run counted them (``include_num_input_tokens_seen``; TRL's SFT ``num_tokens``)."""
    path = os.path.join(config.output_dir, config.metrics_file)
    for record in reversed(read_records(path)):
        for key in ("num_input_tokens_seen", "num_tokens"):
            if isinstance(record.get(key), (int, float)) and record[key] > 0:
                return int(record[key])
    return None


def tracker_url(config) -> str | None:
    """The online page of this run's tracker: an open wandb run that is not offline, or the Trackio Space the run
    reports to."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    url = getattr(run, "url", None) if run is not None else None
    if isinstance(url, str) and url.startswith("http"):
        return url
    space = getattr(config, "trackio_space_id", None)
    reports = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    return f"https://huggingface.co/spaces/{space}" if space and "trackio" in reports else None


def machines() -> int:
    """Machines (nodes) of this run as torchrun announces them: processes / processes per machine (1 when run
    directly)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(world_size() // local, 1) if local > 0 else 1


def run_info(recipe: str, argv: Sequence[str], config, result: dict, wall_time_s: float) -> dict:
    """What :func:`align.card.write_model_card` needs beyond ``config`` and ``result``."""
    return {
        "recipe": recipe,
        "command": reproduce_command(recipe, argv),
        "wall_time_s": float(wall_time_s),
        "processes": world_size(),
        "machines": machines(),
        "device": device(config),
        "precision": precision(config),
        "tokens": tokens_seen(config),
        "datasets": datasets_of(config, (result or {}).get("rows") or {}),
        "versions": versions(),
        "tracker_url": tracker_url(config),
    }
