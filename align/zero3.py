"""DeepSpeed ZeRO-3 as align's trainers need it: whole weights for the passes where processes do different work, a
frozen reference copy made from the partitions, and a line saying the engine is really in effect.

Under ZeRO-3 every parameter is a slice per process (``zero.Init`` partitions the model at load). Inside the
DeepSpeed engine, forward hooks gather each module's weights for its forward and free them after: a collective per
module, so every process must run the same forwards. HF generation, the RL loop's old / reference log-probs of each
process's own samples, GVM's per-sequence gradient norms and the online trainers' sampling do not: each process runs
as many forwards as its own samples need. For those passes :func:`gathered` holds the whole weights in every process
(gathered once at entry, partitioned again at exit, the engine's hooks off in between), as :func:`align.fsdp2.gathered`
does under FSDP2: the memory of a full copy of the weights for the pass ("unshard per generation", issue 15).

* :func:`partitioned_copy`: a frozen copy of a partitioned model (the online trainers' reference, the live DPO
  reference): a new model of the same config, partitioned the same way, each process copying its own slices (no
  communication, no whole copy anywhere). ``copy.deepcopy`` would share the slices' gather functions with the original
  and so read the policy's updated weights.
* :func:`remember_engine` / :func:`describe`: after ``prepare`` the trainer tells the module which engine owns it
  (a weak reference) and prints one line per process: stage, engine, optimizer and how much of the embedding this
  process holds.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager

import torch


def is_partitioned(model) -> bool:
    """Whether ``model`` holds ZeRO-3 partitions (parameters made by ``deepspeed.zero.Init``)."""
    return isinstance(model, torch.nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters())


def not_gathered(params) -> list:
    """The ZeRO-3 partitioned parameters among ``params`` whose whole weight no process holds now (what a gather
    needs; one an enclosing gather or the engine already holds is left to it)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def whole_tensor(param) -> torch.Tensor:
    """One ZeRO-3 parameter's whole weight as a new tensor (a collective: every process gathers the same parameters
    in the same order; one already whole, or no partition at all, is returned as it is, with no communication).
    Pushing weights to a rollout server takes them so, one at a time: no process holds a whole copy of the model."""
    if not not_gathered([param]):
        return param.detach()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([param]):
        return param.detach().clone()


def whole(model) -> bool:
    """Whether every process holds all of ``model``'s weights: no ZeRO-3 partitions, or all of them gathered (inside
    :func:`gathered`)."""
    if not is_partitioned(model):
        return True
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(p.ds_status == ZeroParamStatus.AVAILABLE for p in model.parameters() if hasattr(p, "ds_id"))


_RESTORED: list = []  # keeps alive the config object transformers' ZeRO-3 flag points at again (a weak reference)


@contextmanager
def loading_whole():
    """Within the block, transformers' ``from_pretrained`` loads models whole, as without DeepSpeed: a frozen model
    that stays out of the engine (a reward model, a judge) is then an ordinary model in every process, not ZeRO-3
    partitions nothing would gather. Outside a ZeRO-3 run it changes nothing. transformers' public API can clear its
    ZeRO-3 flag but not hand back the object it pointed at, so the flag is set again from an equal object made from
    the same config (kept alive here)."""
    from transformers.integrations import (
        HfDeepSpeedConfig,
        deepspeed_config,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    config = deepspeed_config()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        _RESTORED[:] = [HfDeepSpeedConfig(config)]


def reuse_plugin(args) -> None:
    """Before a further Trainer in a process whose accelerate state already runs DeepSpeed (the iterative driver's
    later rounds, APO's scorer): accelerate refuses a DeepSpeed plugin passed to a second ``Accelerator`` ("You
    cannot pass in a `deepspeed_plugin` when creating a second `Accelerator`") and takes the first one's from its
    state when none is passed, so ``args``' own is dropped (transformers' Trainer then re-processes that plugin's
    config with these arguments)."""
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    if getattr(args, "deepspeed_plugin", None) is None or not is_initialized():
        return
    if AcceleratorState().distributed_type == DistributedType.DEEPSPEED:
        args.deepspeed_plugin = None


def remember_engine(engine) -> None:
    """Tell the module inside a DeepSpeed ``engine`` which engine owns its hooks (read by :func:`gathered`)."""
    engine.module.align_ds_engine = weakref.ref(engine)


def _offload(model):
    """The engine's ZeRO-3 parameter manager (the object holding its module hooks), or None."""
    ref = getattr(model, "align_ds_engine", None)
    engine = ref() if ref is not None else None
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None) or getattr(engine, "parameter_offload", None)


@contextmanager
def gathered(*models):
    """The ZeRO-3 ``models`` with their whole weights in every process for the block (a collective at entry and exit:
    every process enters together): forwards and ``autograd.grad`` inside run on whole, local parameters, in any
    number per process; an engine's module hooks are off meanwhile. Parameters an enclosing :func:`gathered` already
    holds are left to it; models without partitions pass through."""
    partitioned = [m for m in models if is_partitioned(m)]
    if not partitioned:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with ExitStack() as stack:
        for model in partitioned:  # what is already whole (an enclosing block's, the engine's persistent ones) stays
            todo = not_gathered(model.parameters())
            if not todo:
                continue
            stack.enter_context(GatheredParameters(todo))
            offload = _offload(model)
            if offload is not None and offload.forward_hooks:
                stack.enter_context(_hooks_off(offload))
        yield


@contextmanager
def _hooks_off(offload):
    """The engine's module hooks removed for the block and registered again after, in DeepSpeed's order: the root's
    start-of-forward hook (whose step reset is a collective) first, then every module's gather / release hooks."""
    start = offload.module._forward_pre_hooks.get(offload.fwd_pre_hook.id)
    offload.fwd_pre_hook.remove()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        if start is not None:
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start)
        offload._register_deepspeed_module(offload.module)


def partitioned_copy(model):
    """A frozen copy of the ZeRO-3 ``model``: the same config built under ``zero.Init`` (partitioned the same way),
    each process copying its own slice of every parameter and buffer."""
    from align.errors import TrainingError

    # transformers builds it under zero.Init with the run's DeepSpeed config, as it loaded the policy (the partitions'
    # dtype follows that config; an explicit dtype would hit DeepSpeed's half-precision default on the CPU)
    copy = type(model)._from_config(model.config)
    for src, dst in zip(model.parameters(), copy.parameters(), strict=True):
        if src.ds_tensor.shape != dst.ds_tensor.shape or src.ds_tensor.dtype != dst.ds_tensor.dtype:
            raise TrainingError(f"ZeRO-3 reference copy: a partition of {tuple(src.ds_shape)} is "
                                f"{tuple(src.ds_tensor.shape)} {src.ds_tensor.dtype} in the policy but "
                                f"{tuple(dst.ds_tensor.shape)} {dst.ds_tensor.dtype} in the "
                                "copy; pass ref_model_name_or_path instead")
        dst.ds_tensor.data.copy_(src.ds_tensor.data)
    for src, dst in zip(model.buffers(), copy.buffers(), strict=True):
        dst.data.copy_(src.data)
    return copy.requires_grad_(False).eval()


def describe(engine) -> str:
    """One line saying how this process holds the model under DeepSpeed: ``DeepSpeed ZeRO-3 (process 1 of 2):
    DeepSpeedEngine, optimizer DeepSpeedZeroOptimizer_Stage3; model.embed_tokens.weight: 12288 of 98304 elements
    here`` (ZeRO-1/2: the optimizer's fp32 partition here against all trainable elements)."""
    import torch.distributed as dist

    module = engine.module
    stage = engine.zero_optimization_stage()
    optimizer = type(engine.optimizer).__name__
    head = (f"DeepSpeed ZeRO-{stage} (process {dist.get_rank()} of {dist.get_world_size()}): {type(engine).__name__}, "
            f"optimizer {optimizer}")
    if stage == 3:
        emb = module.get_input_embeddings().weight
        name = next((n for n, p in module.named_parameters() if p is emb), "embedding")
        return f"{head}; {name}: {emb.ds_tensor.numel()} of {emb.ds_numel} elements here"
    groups = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or []
    here = sum(t.numel() for t in groups)
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return f"{head}; optimizer state: {here} of {total} elements here"


# --- exact snapshots of a DeepSpeed ZeRO optimizer (EGPO's half step) -------------------------------------------


def zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer inside accelerate's wrapper (stage 1/2: ``DeepSpeedZeroOptimizer``, stage 3:
    ``DeepSpeedZeroOptimizer_Stage3``), or None for any other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    zero = hasattr(inner, "single_partition_of_fp32_groups") or hasattr(inner, "fp32_partitioned_groups_flat")
    return inner if zero else None


def _zero_tensors(zero) -> list[torch.Tensor]:
    """What this process's ZeRO optimizer keeps of the weights: the fp32 master partitions and the working
    (bit16 / model-dtype) flat groups the model reads (stage 1/2: whole; stage 3: this process's partitions, of
    which the parameters' ``ds_tensor`` are views)."""
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    working = getattr(zero, "bit16_groups_flat", None) or zero.fp16_partitioned_groups_flat
    return [*masters, *working]


def zero_snapshot(optimizer) -> tuple:
    """This process's part of a DeepSpeed ZeRO optimizer, copied: master and working partitions, and the inner
    optimizer's state (Adam's moments and step counts) per master tensor."""
    zero = zero_optimizer(optimizer)
    tensors = [t.detach().clone() for t in _zero_tensors(zero)]
    state = {id(k): {n: (v.detach().clone() if torch.is_tensor(v) else v) for n, v in s.items()}
             for k, s in zero.optimizer.state.items()}
    return tensors, state


def zero_restore(optimizer, saved: tuple) -> None:
    """A DeepSpeed ZeRO optimizer back to :func:`zero_snapshot`, bit for bit, in every process (each restores its
    own part). Under ZeRO-3 the parameters gathered whole at that moment (the small persistent ones DeepSpeed keeps
    gathered) still hold the half step's values: they are released and gathered again from the restored partitions
    (a collective; the same parameters in every process)."""
    zero = zero_optimizer(optimizer)
    tensors, state = saved
    with torch.no_grad():
        for t, value in zip(_zero_tensors(zero), tensors, strict=True):
            t.copy_(value)
        for key, entries in list(zero.optimizer.state.items()):
            if id(key) not in state:  # created by the half step: gone again
                del zero.optimizer.state[key]
                continue
            for name, value in state[id(key)].items():
                if torch.is_tensor(value) and torch.is_tensor(entries.get(name)):
                    entries[name].copy_(value)
                else:
                    entries[name] = value
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        stale = [p for group in zero.fp16_groups for p in group if p.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:
            stale[0].partition(param_list=stale, has_been_updated=False)
            stale[0].all_gather(param_list=stale)
