"""A LoRA policy's adapter pushed to a vLLM engine instead of merged weights (``vllm_lora_adapter``).

The adapter (PEFT's own file format: ``adapter_model.safetensors`` + ``adapter_config.json``, the LoRA factors
only, ~0.1-1% of the model) is loaded into vLLM's LoRA path under one fixed id, replaced in place on every push
(through vLLM's loader, ``load_inplace``, the first time and whenever the config changes; in memory, without a
file, when only the values did: :mod:`align.rollout.lora_worker`), and every generation names it; the base
weights stay as the engine loaded them (the policy's base is frozen under LoRA). The colocated engine and ``align
serve`` (``POST /adapter``, the adapter as one safetensors body with its config in the header) share
:class:`AdapterSlot`.

What the engine cannot load is refused before training in one line: a rank above the engine's ``max_lora_rank``
by :func:`check_adapter`, anything else vLLM's loader refuses (DoRA, LoRA biases, modules it does not adapt) by
loading the initial adapter once when the engine is built. The server's base weights are set to the policy's
base once then (another run may have pushed other weights). An engine without LoRA (``align serve`` without
``--max-lora-rank``) gets the merged weights instead, which the trainer says once.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref

from align.errors import ConfigError
from align.rollout.collective import full_weight

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices
ADAPTER_ID = 1
CONFIG_KEY = "adapter_config"


def has_adapter(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_config(model) -> dict:
    config = model.peft_config[getattr(model, "active_adapter", "default")]
    out = config.to_dict()
    for key, value in out.items():  # sets (target_modules) are not JSON
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def engine_rank(r: int) -> int:
    """The smallest vLLM ``max_lora_rank`` that holds rank ``r`` (ConfigError naming lora_r above vLLM's largest)."""
    for rank in VLLM_RANKS:
        if rank >= r:
            return rank
    raise ConfigError(f"lora_r: {r} is more than vLLM's largest LoRA rank {VLLM_RANKS[-1]}; lower lora_r or set "
                      "vllm_lora_adapter: false (push the merged weights)")


def check_adapter(config: dict, max_rank: int, where: str) -> None:
    """One-line ConfigError for an adapter rank ``where`` (an engine, in words) cannot take; what else vLLM cannot
    load (DoRA, LoRA biases, modules it does not adapt) its own loader refuses when the engine loads the initial
    adapter, before training."""
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise ConfigError(f"lora_r: rank {max(ranks)} is more than {where} takes (max_lora_rank {max_rank}); lower "
                          "lora_r, raise the engine's LoRA rank, or set vllm_lora_adapter: false")


_SAVED_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_params(model) -> dict:
    """The adapter's factors under PEFT's saved names, as the model holds them (a sharded policy's DTensors or ZeRO-3
    partitions: :func:`align.rollout.collective.full_weight` gathers each).

    PEFT's ``get_peft_model_state_dict`` walks the whole model several times (a third of an adapter push at 100M);
    which parameter it saves under which name is worked out once per model and then read by parameter name."""
    from peft import get_peft_model_state_dict

    config = adapter_config(model)
    known = _SAVED_NAMES.get(model)
    if known is not None and known[0] == config:
        params = dict(model.named_parameters())
        if all(name in params for name in known[1].values()):
            return {saved: params[name] for saved, name in known[1].items()}
    state = model.state_dict(keep_vars=True)
    saved = get_peft_model_state_dict(model, state_dict=state)
    params = {id(p): name for name, p in model.named_parameters()}
    if all(id(t) in params for t in saved.values()):  # every saved tensor a parameter: remember the names
        _SAVED_NAMES[model] = (config, {k: params[id(t)] for k, t in saved.items()})
    return saved


def adapter_tensors(model) -> dict:
    """The adapter's factors under PEFT's saved names, whole CPU copies (a sharded policy's gathered one at a time:
    a collective every process takes part in, in the same order)."""
    return {k: full_weight(v).detach().to("cpu", copy=True).contiguous() for k, v in adapter_params(model).items()}


def adapter_payload(model) -> bytes:
    """The adapter as one safetensors file in memory, its config in the header (what ``POST /adapter`` takes)."""
    from safetensors.torch import save

    return save(adapter_tensors(model), metadata={CONFIG_KEY: json.dumps(adapter_config(model))})


class AdapterSlot:
    """One adapter id in a ``vllm.LLM``: :meth:`load` writes the adapter to a private folder (tmpfs where there is
    one) and loads it in place; :attr:`request` is the ``LoRARequest`` every generation passes (None until loaded)."""

    def __init__(self, llm):
        self.llm, self.request = llm, None
        self.folder = tempfile.mkdtemp(prefix="align-adapter-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.version = 0
        self.loaded = None  # (config, tensor names) of what vLLM's loader last took from the files
        self.in_memory = 0  # pushes that replaced the adapter in memory (:mod:`align.rollout.lora_worker`)

    def load(self, config: dict, tensors: dict, payload: bytes | None = None) -> None:
        """Load ``tensors`` (PEFT's names, CPU copies the engine may keep) as the adapter: through vLLM's loader the
        first time and whenever the config or the names change, in memory when only the values did (``payload``,
        the tensors as one safetensors body, is what goes to workers in processes of their own)."""
        from vllm.lora.request import LoRARequest

        shape = (config, sorted(tensors))
        if self.request is not None and self.loaded == shape:
            data = tensors  # workers in this process take the tensors as they are
            if self.llm.llm_engine.vllm_config.parallel_config.world_size > 1:  # workers in processes of their own
                from safetensors.torch import save

                data = payload if payload is not None else save(tensors)
            self.llm.collective_rpc("align_replace_adapter", args=(ADAPTER_ID, config, data))
            self.in_memory += 1
        else:
            from safetensors.torch import save_file

            save_file(tensors, os.path.join(self.folder, "adapter_model.safetensors"))
            with open(os.path.join(self.folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
                json.dump(config, fh)
            self.loaded = None
            self.llm.llm_engine.add_lora(LoRARequest("align-policy", ADAPTER_ID, self.folder, load_inplace=True))
            self.loaded = shape
            # vLLM holds the adapter now; without the file, a reload vLLM might attempt later fails loudly instead of
            # serving these values after a newer push replaced them in memory
            os.remove(os.path.join(self.folder, "adapter_model.safetensors"))
        self.version += 1
        self.llm.reset_prefix_cache()  # cached KV entries were computed with the old adapter
        self.request = LoRARequest("align-policy", ADAPTER_ID, self.folder)

    def load_payload(self, payload: bytes) -> None:
        from safetensors.torch import load

        header = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])  # the safetensors header
        config = (header.get("__metadata__") or {}).get(CONFIG_KEY)
        if config is None:
            raise ValueError(f"the adapter body has no {CONFIG_KEY} in its safetensors metadata")
        self.load(json.loads(config), load(payload), payload)

    def drop(self) -> None:
        """Generate with the base weights again (after a merged push)."""
        self.request = None

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

