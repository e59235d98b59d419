"""What the shipped real-model configs (``configs/<method>/<model>*.yaml``, not the testbed or quickstart ones) were
sized for, and an estimate of the GPU memory each process needs under it (docs/configs.md holds the table this module
renders: ``python -m align.sizing`` prints it; tests/unit/test_real_configs.py keeps the two equal).

Each such config's header has one line ``# Sized for: configs/accelerate/<file>.yaml on <N> GPUs of <G> GB; rollout:
<engine>`` (:func:`sized_for`). The estimate (:func:`estimate`), per process, in GiB:

* weights, gradients and Adam's two moments: float32 master weights for a half ``torch_dtype`` (4 + 4 + 8 bytes a
  trained parameter; ``pure_bf16``: 2 + 2 + 4), divided by the processes where the named sharding shards them (ZeRO-1:
  Adam; ZeRO-2: Adam and gradients; ZeRO-3 / FSDP: all three); with LoRA the base stays in ``torch_dtype`` (2 bytes)
  and only the adapter trains;
* the reference: precomputed log-probs take none; a frozen copy of the policy (online DPO / XPO / EGPO, RL with
  ``beta > 0``) takes the weights' bytes again, unsharded; with LoRA the adapter-off base is the reference;
* a reward model or judge: its parameters in bfloat16 on every process (:func:`align.modeling.place_frozen`);
* rollouts: a colocated vLLM engine takes ``vllm_gpu_memory_utilization`` of the GPU; the HF engine's KV cache is
  ``generation_batch_size`` sequences of ``max_prompt_length + max_completion_length`` tokens;
* activations of one micro-batch (T tokens: pairs x 2 x ``max_length``, or RL's ``micro_batch_size`` x (prompt +
  completion)): bfloat16 inputs the backward keeps, about ``T x (6h + 4i)`` values a layer (h: hidden size, i: MLP
  width; sdpa keeps no attention matrix); with gradient checkpointing one layer's worth plus each layer's input;
* the logits: float32 (value, log-softmax, gradient: 3 x 4 bytes) of one ``logits_block_size`` block, ``auto``:
  ``min(T, 512, 2^25 / vocab)`` tokens; 0 (off): all T tokens.

Not counted: the CUDA context and allocator slack (~1-3 GiB), temporary buffers of the optimizer step and
communication buckets. An estimate, not a measurement: the GPU check (scripts/gpu_check.sh) measures peak memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
HEADER = re.compile(r"^# Sized for: (configs/accelerate/[\w.-]+\.yaml) on (\d+) GPUs? of (\d+) GB; rollout: "
                    r"(hf|vllm|vllm-server|none)\b", re.M)
SHARDS = {"ddp.yaml": (), "zero1.yaml": ("adam",), "zero2.yaml": ("adam", "grads"),
          "zero3.yaml": ("adam", "grads", "weights"), "fsdp2.yaml": ("adam", "grads", "weights"),
          "multi_node.yaml": ("adam", "grads", "weights")}


@dataclass(frozen=True)
class Shape:
    params: float  # parameters, all of them
    hidden: int
    mlp: int  # MLP width (intermediate_size)
    layers: int
    vocab: int
    kv_dim: int  # key/value heads x head dim
    lora_io: int = 0  # sum over one layer's q, k, v, o, gate, up, down of (in + out): LoRA's r x this a layer


# The models the configs name, from their config.json (no download at test time). Judges and reward models need
# only their parameter count; a placeholder judge path is sized as the paper's judge (named in the config).
MODELS = {
    "Qwen/Qwen2.5-0.5B-Instruct": Shape(494e6, 896, 4864, 24, 151936, 128, 22912),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1544e6, 1536, 8960, 28, 151936, 256),
    "Qwen/Qwen2.5-Math-1.5B": Shape(1544e6, 1536, 8960, 28, 151936, 256),
    "mistralai/Mistral-7B-Instruct-v0.2": Shape(7242e6, 4096, 14336, 32, 32000, 1024, 81920),
    "openchat/openchat-3.5-0106": Shape(7242e6, 4096, 14336, 32, 32002, 1024, 81920),
}
JUDGES = {
    "reward:model:trl-lib/Qwen2-0.5B-Reward": 494e6,
    "reward:model:Nexusflow/Starling-RM-34B": 34.4e9,
    "pairwise:path/to/your-pairwise-preference-model": 2.61e9,  # the EGPO paper's gemma-2-2b-it judge
    "pairwise:your-org/pairrm-seqcls": 0.44e9,  # PairRM (DeBERTa-v3-large) exported as a sequence classifier
}


@dataclass(frozen=True)
class SizedFor:
    accelerate: str
    gpus: int
    gpu_gb: int
    rollout: str


def sized_for(text: str) -> SizedFor | None:
    """The ``# Sized for:`` line of a config file's text, or None."""
    m = HEADER.search(text)
    return SizedFor(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)) if m else None


def real_configs(root: Path) -> list[Path]:
    """``configs/<method>/<model>*.yaml`` below the repository ``root``: every config but the accelerate ones, the
    testbed and the quickstart."""
    return sorted(p for p in (root / "configs").glob("*/*.yaml")
                  if p.parent.name != "accelerate" and not p.name.startswith(("testbed", "quickstart")))


def tokens_per_micro_batch(method: str, cfg: dict) -> int:
    if method in ("grpo", "raft"):
        return cfg.get("micro_batch_size", 64) * (cfg.get("max_prompt_length", 512) + cfg.get("max_completion_length",
                                                                                              256))
    if method in ("online_dpo", "xpo", "egpo"):
        return cfg["per_device_train_batch_size"] * 2 * (cfg["max_prompt_length"] + cfg["max_completion_length"])
    return cfg["per_device_train_batch_size"] * 2 * cfg.get("max_length", 512)


def estimate(method: str, cfg: dict, sized: SizedFor) -> dict[str, float]:
    """GiB per process, by part (see the module's notes); ``cfg`` is the config file's mapping."""
    shape = MODELS[cfg["model_name_or_path"]]
    n = sized.gpus
    shard = SHARDS[Path(sized.accelerate).name]
    half = cfg.get("torch_dtype", "float32") in ("bfloat16", "float16")
    p = shape.params
    out: dict[str, float] = {}
    if cfg.get("use_peft"):
        lora = cfg.get("lora_r", 16) * shape.lora_io * shape.layers
        out["weights"] = (p * (2 if half else 4) + 4 * lora) / GIB
        out["grads"], out["adam"] = 4 * lora / GIB, 8 * lora / GIB
        out["reference"] = 0.0  # the adapter-off base
    else:
        master = 2 if half and cfg.get("pure_bf16") else 4
        out["weights"] = master * p / (n if "weights" in shard else 1) / GIB
        out["grads"] = master * p / (n if "grads" in shard else 1) / GIB
        out["adam"] = 2 * master * p / (n if "adam" in shard else 1) / GIB
        copy = (method in ("online_dpo", "xpo", "egpo") or (method in ("grpo", "raft") and cfg.get("beta", 0) > 0)
                or (method == "dpo" and cfg.get("precompute_ref_logps") is False))
        out["reference"] = master * p / GIB if copy else 0.0
    judge = cfg.get("oracle") or next((f"reward:{f}" for f in cfg.get("reward_funcs", []) if f.startswith("model:")),
                                      None)
    out["judge"] = 2 * JUDGES[judge] / GIB if judge in JUDGES else 0.0
    if sized.rollout == "vllm":
        out["rollout"] = cfg.get("vllm_gpu_memory_utilization", 0.3) * sized.gpu_gb * 1e9 / GIB
    elif sized.rollout == "hf":
        seq = cfg.get("max_prompt_length", 512) + cfg.get("max_completion_length", 256)
        out["rollout"] = cfg.get("generation_batch_size", 64) * seq * shape.layers * 2 * shape.kv_dim * 2 / GIB
    else:
        out["rollout"] = 0.0
    t = tokens_per_micro_batch(method, cfg)
    per_layer = 2 * t * (6 * shape.hidden + 4 * shape.mlp)
    if cfg.get("gradient_checkpointing"):
        out["activations"] = (per_layer + 2 * t * shape.hidden * shape.layers) / GIB
    else:
        out["activations"] = per_layer * shape.layers / GIB
    block = cfg.get("logits_block_size", "auto")
    rows = min(t, 512, 2**25 // shape.vocab) if block == "auto" else (t if not block else min(t, block))
    out["logits"] = 3 * 4 * rows * shape.vocab / GIB
    out["total"] = sum(out.values())
    return out


COLUMNS = ("config", "model", "method", "launch", "GPUs", "rollout", "weights+grads+Adam", "reference", "judge/RM",
           "rollout mem", "activations+logits", "total / GPU")


def table_rows(root: Path) -> list[list[str]]:
    """One row per real-model config: what it was sized for and its estimate, in GiB (docs/configs.md)."""
    import yaml

    rows = []
    for path in real_configs(root):
        text = path.read_text(encoding="utf-8")
        sized = sized_for(text)
        method = path.parent.name
        cfg = yaml.safe_load(text)
        est = estimate(method, cfg, sized)
        model = cfg["model_name_or_path"].split("/")[-1]
        rows.append([f"`{path.relative_to(root)}`", model, method, f"`{Path(sized.accelerate).name}`",
                     f"{sized.gpus} x {sized.gpu_gb} GB", sized.rollout,
                     f"{est['weights'] + est['grads'] + est['adam']:.1f}", f"{est['reference']:.1f}",
                     f"{est['judge']:.1f}", f"{est['rollout']:.1f}", f"{est['activations'] + est['logits']:.1f}",
                     f"**{est['total']:.0f}**"])
    return rows


def render_table(root: Path) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(root)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table(Path(__file__).resolve().parents[1]))
