"""Sharded and multi-process runs: which sharding a run asks for, whether accelerate really runs it, and the passes
that run on the weights outside the sharded wrapper (before ``accelerator.prepare``).

* :func:`sharding`: whether the run shards the weights or the optimizer state across processes: FSDP shards both;
  DeepSpeed ZeRO-1/2 shard the optimizer state (ZeRO-2 also gradients), ZeRO-3 the weights too; ZeRO-0 shards
  nothing. Read from what ``accelerate launch`` puts in the environment and from the ``fsdp`` / ``deepspeed``
  training arguments, before any process group or model exists.
* :func:`check_launch`: the launcher against the run, before any model loads. accelerate 1.15 never builds its FSDP
  or DeepSpeed plugin for a CPU run (``use_cpu``). A DeepSpeed launch on a machine without a GPU therefore runs with
  ``use_cpu: false`` and ``ddp_backend: gloo`` (:func:`deepspeed_on_cpu`, the defaults align gives it): accelerate
  then starts DeepSpeed's engine on DeepSpeed's CPU accelerator, so ZeRO-1/2/3 really shard there, as on GPUs. With
  ``use_cpu: true`` set by hand, FSDP and ZeRO-0/1/2 run as plain DDP (a warning, once: the numbers are DDP's,
  :func:`cpu_fallback_warning`) and ZeRO-3 is refused (transformers has already partitioned the weights with
  ``zero.Init`` by then, so DDP would train the partitions). Every trainer and option runs under every sharding
  (docs/architecture.md, Sharding): nothing is refused by option.
* :func:`share_rank0_weights`: ``fsdp_cpu_ram_efficient_loading`` makes transformers load the real weights on local
  rank 0 only and zeros everywhere else, for FSDP to broadcast at ``prepare``; every pass align runs before that
  (reference log-probs, a frozen reference copy, sampling, a reward model) would read the zeros, so the loaders
  broadcast rank 0's tensors into the others first.
* :func:`full_weights`: a pass before ``prepare`` computes with the full weights: under ZeRO-3 each process holds
  a slice of every weight outside the DeepSpeed engine, so each module's weights are gathered for its forward and
  freed after (one module's at a time); a model FSDP has left on the CPU until ``prepare`` visits the GPU for the
  pass.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from align.errors import ConfigError


@dataclass(frozen=True)
class Sharding:
    kind: str | None  # "FSDP", "ZeRO-<stage>", "DeepSpeed" (stage not given), or None (every process holds all)
    shards_weights: bool
    shards_optimizer: bool


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def sharding(args) -> Sharding:
    """How ``args`` (a config with ``fsdp`` and ``deepspeed`` keys) and the launcher's environment shard this run."""
    if env_flag("ACCELERATE_USE_FSDP") or args.fsdp:
        return Sharding("FSDP", True, True)
    ds = args.deepspeed
    if not (env_flag("ACCELERATE_USE_DEEPSPEED") or ds):
        return Sharding(None, False, False)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") if env_flag("ACCELERATE_USE_DEEPSPEED") else ""
    if isinstance(ds, str) and os.path.isfile(ds):
        with open(ds, encoding="utf-8") as fh:
            ds = json.load(fh)
    if isinstance(ds, dict):
        stage = str(ds.get("zero_optimization", {}).get("stage", stage))
    if not stage:
        return Sharding("DeepSpeed", False, True)  # stage unknown: assume the optimizer state is sharded
    return Sharding(f"ZeRO-{stage}", stage == "3", stage != "0")


def has_accelerator() -> bool:
    """Whether this machine has a GPU (CUDA or XPU) for accelerate to run on."""
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def deepspeed_on_cpu() -> bool:
    """Whether this is a DeepSpeed launch (``accelerate launch`` with a DeepSpeed config) on a machine without a GPU:
    align then runs DeepSpeed itself on the CPU, with ``use_cpu: false`` and ``ddp_backend: gloo`` as the run's
    defaults (accelerate starts the DeepSpeed engine only for a run that is not ``use_cpu``; with a backend named it
    joins the gloo process group, and DeepSpeed picks its CPU accelerator)."""
    return env_flag("ACCELERATE_USE_DEEPSPEED") and not has_accelerator()


def apply_deepspeed_on_cpu(values: dict) -> None:
    """A recipe config's raw ``values`` in a DeepSpeed launch without a GPU (:func:`deepspeed_on_cpu`), unless
    ``use_cpu`` is set by hand: ``ddp_backend`` gloo by default, and half precision refused in one line (transformers
    allows it without a GPU only with ``use_cpu``, which would run the launch as DDP)."""
    if not deepspeed_on_cpu() or values.get("use_cpu"):
        return
    values["ddp_backend"] = values.get("ddp_backend") or "gloo"
    if values.get("bf16") or values.get("fp16"):
        raise ConfigError("torch_dtype / bf16: DeepSpeed on the CPU (a DeepSpeed launch without a GPU) trains in "
                          "float32 here (transformers allows half precision without a GPU only with use_cpu, which "
                          "runs the launch as DDP); set torch_dtype: float32")


def runs_on_cpu(args) -> bool:
    """Whether accelerate runs this job as a CPU run, where it builds no FSDP or DeepSpeed plugin: ``use_cpu`` (the
    config's, or the launcher's ``use_cpu: true``), or no accelerator at all, except a DeepSpeed launch that is not
    ``use_cpu`` (:func:`deepspeed_on_cpu`: DeepSpeed's own CPU accelerator)."""
    if bool(getattr(args, "use_cpu", False)) or env_flag("ACCELERATE_USE_CPU"):
        return True
    return not has_accelerator() and not deepspeed_on_cpu()


def cpu_fallback_warning(kind: str) -> str:
    """The warning for a sharding ``kind`` ("FSDP", "ZeRO-2", ...) that accelerate runs as plain DDP on the CPU."""
    engine = "FSDP" if kind == "FSDP" else "DeepSpeed"
    return (f"warning: distributed_type: {kind} was asked for, but accelerate 1.15 does not run {engine} on the CPU "
            "(use_cpu): this run is plain data parallel (DDP), every process holding the whole model and optimizer "
            f"state. The numbers are DDP's, which are {kind}'s up to float rounding (docs/architecture.md, Sharding); "
            "the memory saving is not there.")


# Recipes whose trainer align shards itself under an FSDP config (align/fsdp2.py), on the CPU, where accelerate 1.15
# runs no FSDP, and on GPUs, where accelerate's would shard only at ``prepare``, after align's first passes (the
# reference log-probs, the frozen reference copy) and with generation left to ``synced_gpus``. The iterative driver's
# rounds are DPO trainers (sharded); its sampling and win-rate models are whole copies it loads in every process. SFT
# (TRL's SFTTrainer) runs an FSDP config on the CPU as DDP with :func:`cpu_fallback_warning`, on GPUs with
# accelerate's.
FSDP2_RECIPES = ("dpo", "grpo", "raft", "online_dpo", "xpo", "egpo", "iterative_dpo")
FSDP2_NOTE = ("note: distributed_type: FSDP: align shards the policy itself with torch's FSDP2 (fully_shard on each "
              "decoder layer and the model, before its first pass; docs/architecture.md, Sharding)")


def own_fsdp2(args) -> bool:
    """Whether this run's policy is sharded by align (an FSDP config, a recipe of :data:`FSDP2_RECIPES`, or no recipe:
    the library used directly)."""
    return sharding(args).kind == "FSDP" and getattr(args, "recipe_name", None) in (None, *FSDP2_RECIPES)


def announce_fsdp2(args) -> None:
    """Say once (main process) that align shards this run itself."""
    if os.environ.get("RANK", "0") == "0":
        print(FSDP2_NOTE, file=sys.stderr, flush=True)


def check_launch(args) -> None:
    """The launcher's sharding against this run, before any model loads (see the module's notes): a one-line
    ConfigError for what cannot run; :func:`cpu_fallback_warning` once (main process) for a sharding run as DDP."""
    shards = sharding(args)
    if shards.kind is None:
        return
    if own_fsdp2(args):  # an FSDP config align shards itself, on the CPU and on GPUs
        return announce_fsdp2(args)
    if runs_on_cpu(args):
        if shards.kind == "ZeRO-3":
            raise ConfigError(
                "use_cpu: true makes accelerate 1.15 run a DeepSpeed launch as plain DDP, after transformers had "
                "already partitioned the weights for ZeRO-3; leave use_cpu unset (a DeepSpeed launch without a GPU "
                "then runs DeepSpeed on the CPU), or launch with configs/accelerate/zero2.yaml or cpu2.yaml")
        if os.environ.get("RANK", "0") == "0":
            print(cpu_fallback_warning(shards.kind), file=sys.stderr, flush=True)


def check_in_effect(args, accelerator) -> None:
    """After the Trainer has built its accelerator: a sharding asked for but not in effect that
    :func:`check_launch` did not foresee (its CPU case is already reported) is an error, not a quiet DDP run."""
    shards = sharding(args)
    if shards.kind is None or runs_on_cpu(args):
        return
    actual = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    wanted = "FSDP" if shards.kind == "FSDP" else "DEEPSPEED"
    if actual != wanted:
        from align.errors import TrainingError

        raise TrainingError(f"distributed_type: {shards.kind} was asked for, but accelerate runs {actual}: the run "
                            "would not be sharded; check the accelerate config and that its processes see a GPU each")


# --- weights every process needs before prepare ---------------------------------------------------------------


def rank0_loads_alone() -> bool:
    """Whether transformers loaded the real weights on local rank 0 only (FSDP's ``fsdp_cpu_ram_efficient_loading``
    in a process group of several), leaving zeros in the other processes: transformers' own rule."""
    import torch.distributed as dist

    return (env_flag("ACCELERATE_USE_FSDP") and env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
            and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def share_rank0_weights(model):
    """``model`` with rank 0's parameters and buffers broadcast into every process, one tensor at a time, when
    :func:`rank0_loads_alone`; else ``model`` unchanged. A backend that cannot send CPU tensors (NCCL alone) gets
    each one through this process's GPU."""
    if not rank0_loads_alone():
        return model
    broadcast_from_rank0([*model.parameters(), *model.buffers()])
    return model


def broadcast_from_rank0(tensors) -> None:
    """Rank 0's values of ``tensors`` copied into every process, one tensor at a time (a collective). A backend that
    cannot send CPU tensors (NCCL alone) gets each one through this process's GPU."""
    import torch
    import torch.distributed as dist

    cpu_ok = "gloo" in str(dist.get_backend()).lower() or "mpi" in str(dist.get_backend()).lower()
    device = None if cpu_ok or not torch.cuda.is_available() else torch.device("cuda", torch.cuda.current_device())
    for t in tensors:
        if device is None or t.device.type != "cpu":
            dist.broadcast(t.data, src=0)
        else:
            moved = t.data.to(device)
            dist.broadcast(moved, src=0)
            t.data.copy_(moved.cpu())


@contextmanager
def full_weights(model, device=None):
    """Forwards of ``model`` with its full weights on ``device``, outside any sharded wrapper (a pass before
    ``prepare``): under ZeRO-3 (parameters partitioned by ``zero.Init`` and no DeepSpeed engine's hooks on the model
    yet) each module gathers its own parameters for its forward and partitions them again after; a model whose
    placement FSDP / DeepSpeed postponed to ``prepare`` (on the CPU while ``device`` is a GPU) moves to ``device`` for
    the pass and back after; anything else runs as it is."""
    params = list(model.parameters())
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned and not any(hasattr(m, "ds_id") for m in model.modules()):
        with _gather_per_module(model):
            yield model
        return
    elsewhere = device is not None and not partitioned and any(p.device != device for p in params)
    if not elsewhere:
        yield model
        return
    home = params[0].device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


@contextmanager
def _gather_per_module(model):
    import deepspeed

    from align.zero3 import not_gathered

    open_ = {}

    def before(module, _inputs):  # what an enclosing gather (align.zero3.gathered, a tied weight's) holds stays
        ctx = deepspeed.zero.GatheredParameters(not_gathered(module.parameters(recurse=False)))
        ctx.__enter__()
        open_.setdefault(id(module), []).append(ctx)

    def after(module, _inputs, _output):
        stack = open_.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_.values():  # a forward that raised: partition what it left gathered
            while stack:
                stack.pop().__exit__(None, None, None)
