"""Checks of a local model folder's files, cheap enough to run with the config (before any weights are read).

:func:`check_model_folder` reads ``config.json`` (valid JSON, a ``model_type`` this transformers can load as a causal
LM), finds the weights file transformers would pick (``model.safetensors``, its sharded index, or
``pytorch_model.bin`` / its index) and checks each safetensors file's header against the file's size, so a
corrupt, truncated or missing file is one line naming it instead of a traceback after the data has been prepared.
"""

from __future__ import annotations

import json
import os

from align.errors import ConfigError

# In the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MAX_HEADER = 100 * 2**20  # safetensors refuses headers larger than 100 MB


def read_json(path: str, key: str):
    """The JSON document in ``path``; a one-line ConfigError naming the file and the place it breaks."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                          ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not valid JSON (not UTF-8 text)") from None
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path} ({err.strerror})") from None


def check_model_folder(folder: str, key: str) -> None:
    """``folder`` holds a model that ``AutoModelForCausalLM.from_pretrained`` can load, as far as its files tell."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{key}: folder {folder!r} has no config.json, so it is not a model folder")
    config = read_json(config_path, key)
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {config_path} must hold a JSON object, got {type(config).__name__}")
    if "auto_map" not in config:  # custom modelling code decides its own type (with trust_remote_code)
        check_model_type(config.get("model_type"), config_path, key)
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise ConfigError(f"{key}: folder {folder!r} has no weights file (one of {', '.join(WEIGHT_FILES)})")
    path = os.path.join(folder, present[0])
    if present[0].endswith(".index.json"):
        for shard in index_shards(path, key):
            if shard.endswith(".safetensors"):
                check_safetensors(shard, key)
    elif path.endswith(".safetensors"):
        check_safetensors(path, key)
    elif os.path.getsize(path) == 0:
        raise ConfigError(f"{key}: {path} is empty; re-download or re-save the model")


def check_model_type(model_type, config_path: str, key: str) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not model_type:
        raise ConfigError(f"{key}: {config_path} has no model_type, so transformers cannot tell which model it is")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{key}: unknown model_type {model_type!r} in {config_path} (transformers "
                          f"{transformers.__version__} does not know it: fix the name, or upgrade transformers)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{key}: model_type {model_type!r} in {config_path} is not a causal language model "
                          "(AutoModelForCausalLM cannot load it)")


def index_shards(index_path: str, key: str) -> list[str]:
    """The shard files a sharded checkpoint's index names, each of which must exist."""
    index = read_json(index_path, key)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{key}: {index_path} has no weight_map of tensor -> shard file")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        path = os.path.join(os.path.dirname(index_path), str(name))
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: {index_path} names shard {name!r}, which is missing")
        shards.append(path)
    return shards


def check_safetensors(path: str, key: str) -> None:
    """The file's header is a safetensors header and the file is as long as the tensors it describes."""
    size = os.path.getsize(path)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{key}: {path} {what}; re-download or re-save the model")

    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(size - 8, MAX_HEADER):
            raise bad(f"is not a safetensors file or is truncated ({size} bytes, the header length field says "
                      f"{max(n, 0)})")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("is not a safetensors file (its header is not JSON)") from None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise bad("is not a safetensors file (its header lists no tensors with data_offsets)") from None
    if 8 + n + end > size:
        raise bad(f"is truncated ({size} bytes, its header describes {8 + n + end})")
