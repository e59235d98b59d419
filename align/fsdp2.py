"""FSDP2 driven by align: ``torch.distributed.fsdp.fully_shard`` behind accelerate's FSDP config.

accelerate 1.15 never builds its FSDP plugin on the CPU (``use_cpu``): it would run an FSDP config as plain DDP. On
GPUs it shards at ``prepare``, inside ``train()``: after align's first passes, with generation left to
``synced_gpus``. For the trainers that support it (:data:`align.sharding.FSDP2_RECIPES`), on either,
:class:`align.trainers.base.AlignTrainer` shards the policy itself instead, in its ``__init__``, before any pass reads
it and before the Trainer builds the optimizer (accelerate's ``prepare`` then leaves the FSDP2 module as it is):

* :func:`shard`: ``fully_shard`` on each decoder layer (the classes the model names in ``_no_split_modules``, else
  ``model.model.layers``), then on the whole model, with ``reshard_after_forward`` from the config
  (``fsdp_reshard_after_forward``, :func:`reshard_after_forward`). Every parameter becomes a DTensor sharded on dim 0
  across the processes (the testbed's 384 x 256 embedding: 192 x 256 per process). Parameters stay float32; a
  ``mixed_precision`` launch autocasts the forward as it does without FSDP.
* The Trainer prepares the sharded model without DDP (transformers' own path for models that own their sharding);
  FSDP2 reduce-scatters (averages) the gradients after each backward, so gradient accumulation and the loss
  scaling are DDP's; ``clip_grad_norm_`` and the logged ``grad_norm`` are the global norm (accelerate's
  DTensor-aware clip: each process's partial sum of squares, all-reduced).
* :class:`FSDP2Checkpoints` (mixed into the trainer): ``save_model`` and every checkpoint write the FULL weights
  (gathered on the main process: the files of a 1-process run); the optimizer state is gathered into the
  1-process ``optimizer.pt`` format (state keyed by parameter index) and loaded back into each process's shards: a
  sharded checkpoint resumes exactly, and is a 1-process checkpoint (one process resumes it too).
* A frozen reference copy of the policy (the online trainers) is copied whole before the policy is sharded and
  sharded the same way (``AlignTrainer.setup_reference``).
* :func:`gathered`: passes where processes do different work (HF generation, EGPO's mixture, the win rate, old /
  reference log-probs of each process's own samples, GVM's per-sequence gradient norms) run on the whole model,
  gathered once for the pass:
  forwards then need no collective, so their number may differ between processes (no ``synced_gpus`` needed), and
  per-sequence gradients taken against the gathered parameters are whole (their norms need no all-reduce).
  The memory of a full copy of the weights is held for the pass only ("unshard per generation", issue 15).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch

from align import zero3
from align.sharding import env_flag, own_fsdp2, runs_on_cpu


def wanted(args, trainer_class) -> bool:
    """Whether align shards this run itself: an FSDP config, a trainer that supports it
    (``trainer_class.fsdp2_supported``) in a recipe that does (:func:`align.sharding.own_fsdp2`), a process group of
    several processes (or of one on a GPU: torchrun starts one for any FSDP launch there)."""
    import torch.distributed as dist

    if not getattr(trainer_class, "fsdp2_supported", False) or not own_fsdp2(args):
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size() > 1 or not runs_on_cpu(args)


def reshard_after_forward(args) -> bool:
    """``fsdp_reshard_after_forward`` of the accelerate config (``FSDP_RESHARD_AFTER_FORWARD``), else of the
    ``fsdp_config`` training argument; default true (free each layer's gathered weights after its forward)."""
    if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
        return env_flag("FSDP_RESHARD_AFTER_FORWARD")
    config = getattr(args, "fsdp_config", None) or {}
    return str(config.get("reshard_after_forward", True)).lower() in ("1", "true")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules whose class the model (or the model inside a LoRA wrapper) names in
    ``_no_split_modules``, else the items of ``model.model.layers``."""
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:  # peft
        base = base.get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def shard(model, reshard: bool = True):
    """``model`` with ``fully_shard`` applied to each decoder layer and then to the whole (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard)
    # the root: FSDP2's default (None), which keeps its weights gathered after the forward (the backward follows)
    fully_shard(model, reshard_after_forward=None if reshard else False)
    if hasattr(model, "get_base_model"):
        # a LoRA model's generate calls the inner model's, whose forward reaches the decoder layers without passing the
        # root: FSDP2 would then take the first layer for a root ("already lazily initialized" at the next forward)
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    model.align_fsdp2_reshard = reshard
    return model


def describe(model) -> str:
    """One line saying how this process holds ``model`` under FSDP2: its units and the input embedding's local shard
    against the whole (``model.embed_tokens.weight: 192 x 256 here of 384 x 256``)."""
    import torch.distributed as dist

    emb = model.get_input_embeddings().weight
    name = next((n for n, p in model.named_parameters() if p is emb), "embedding")
    local = emb.to_local() if hasattr(emb, "to_local") else emb
    shape = " x ".join(map(str, local.shape)), " x ".join(map(str, emb.shape))
    return (f"FSDP2 (process {dist.get_rank()} of {dist.get_world_size()}): fully_shard on {len(fsdp_modules(model))} "
            f"modules, {type(emb).__name__} parameters; {name}: {shape[0]} here of {shape[1]}")


def fsdp_modules(*models) -> list[torch.nn.Module]:
    """Every FSDP2 module (a ``fully_shard`` unit) in ``models`` (None entries skipped)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for model in models if isinstance(model, torch.nn.Module) for m in model.modules()
            if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(fsdp_modules(model))


@contextmanager
def gathered(*models):
    """The FSDP2 ``models`` with their whole weights gathered in every process for the block (a collective at entry
    and exit: every process enters together), each layer kept gathered after its forward and backward, no gradient
    reduction: forwards and ``autograd.grad`` inside run on local, whole parameters (``model.named_parameters()``
    gives the gathered ones while open), in any number per process. Models partitioned by DeepSpeed ZeRO-3 are
    gathered the same way (:func:`align.zero3.gathered`); others pass through."""
    with zero3.gathered(*models), _fsdp2_gathered(*models):
        yield


@contextmanager
def _fsdp2_gathered(*models):
    units = fsdp_modules(*models)
    if not units:
        yield
        return
    roots = {id(m) for m in models if m is not None}
    reshard = all(getattr(m, "align_fsdp2_reshard", True) for m in models if m is not None)
    for m in units:
        m.unshard()
        if id(m) in roots:
            m.align_fsdp2_gathered = True  # read by generate_kwargs
    for m in units:
        if id(m) not in roots:  # the root never reshards after forward (FSDP2's own rule)
            m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            if id(m) not in roots:
                m.set_reshard_after_forward(reshard, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
            m.set_requires_gradient_sync(True, recurse=False)
            m.reshard()
            m.align_fsdp2_gathered = False


def generate_kwargs(model) -> dict:
    """Extra arguments of HF ``generate`` for ``model``: transformers turns ``synced_gpus`` on for any FSDP-managed
    model in a process group (each process then runs forwards until every process is done, and one that calls
    ``generate`` fewer times than another hangs it), and for every model while DeepSpeed ZeRO-3 is on; inside
    :func:`gathered`, or for a model with no partitions, no forward needs a collective, so it is turned off and each
    process generates its own share, any number of calls."""
    whole = getattr(model, "align_fsdp2_gathered", False) or zero3.whole(model)
    return {"synced_gpus": False} if whole else {}


# --- full state dicts ---------------------------------------------------------------------------------


def full_state_dict(model) -> dict:
    """The model's full state dict (plain CPU tensors) on process 0, ``{}`` elsewhere (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict, strict: bool = True) -> None:
    """Load a full state dict (every process passes the whole) into ``model``'s shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_full_state(model, optimizer) -> dict:
    """The optimizer's full state, on process 0, in ``torch.optim.Optimizer.state_dict()``'s own format (state keyed
    by the parameter's index across the param groups, as a 1-process run writes it); ``{}`` elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, inner_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index, groups = {}, []
    for group in full["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_full_state(model, optimizer, state: dict) -> None:
    """Load an optimizer state in the 1-process format (:func:`optimizer_full_state`; every process passes the whole)
    into each process's shards of the optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opt = inner_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    groups, at = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": fqns[at : at + len(group["params"])]})
        at += len(group["params"])
    fqn_state = {"state": {fqns[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, fqn_state, options=StateDictOptions(full_state_dict=True))


def read_weights(folder: str) -> dict | None:
    """The full weights a checkpoint folder holds (``model.safetensors`` or its sharded index), or None."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single, device="cpu")
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name), device="cpu"))
    return state


def adapter_state(model, path: str) -> dict:
    """The LoRA factors saved at ``path`` (PEFT's file, PEFT's names) under ``model``'s own state-dict keys, for
    :func:`load_full_state_dict` into its shards (a checkpoint of a LoRA run holds the adapter alone)."""
    from safetensors.torch import load_file

    from align.rollout.lora import adapter_params

    keys = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    saved = load_file(path, device="cpu")
    params = adapter_params(model)
    if saved.keys() != params.keys():
        from align.errors import TrainingError

        missing, unknown = sorted(params.keys() - saved.keys())[:3], sorted(saved.keys() - params.keys())[:3]
        raise TrainingError(f"resume_from_checkpoint: {path} holds another adapter than this run's (missing: "
                            f"{missing}, unknown: {unknown})")
    return {keys[id(param)]: saved[name] for name, param in params.items()}


class FSDP2Checkpoints:
    """Mix into a ``transformers.Trainer`` subclass that sets ``self.fsdp2`` (True when the model is sharded by
    :func:`shard`): full weights and a 1-process-format optimizer state in, out of each sharded run (module notes).
    Without FSDP2 every method is the Trainer's."""

    fsdp2: bool = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.fsdp2:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state = full_state_dict(self.model)  # every process: the gather is a collective
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.fsdp2:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = optimizer_full_state(self.model, self.optimizer)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, "optimizer.pt"))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.fsdp2:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        adapter = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if hasattr(self.model, "peft_config") and os.path.isfile(adapter):  # LoRA: the checkpoint holds the adapter
            return load_full_state_dict(self.model, adapter_state(self.model, adapter), strict=False)
        state = read_weights(resume_from_checkpoint)
        if state is None:
            from align.errors import TrainingError

            raise TrainingError(f"resume_from_checkpoint: {resume_from_checkpoint} holds no model.safetensors (full "
                                "weights) to load into the FSDP2 shards")
        tied = bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
        load_full_state_dict(self.model, state, strict=not tied)  # a tied head is saved once, under the embedding

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.fsdp2 or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, "optimizer.pt")
        if not os.path.isfile(path):
            return
        load_optimizer_full_state(self.model, self.optimizer, torch.load(path, map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))
