"""Run by test_fsdp2.py under ``torch.distributed.run --nproc_per_node 2`` (gloo): the testbed policy sharded by
:func:`align.fsdp2.shard`, against an unsharded copy in each process. Each process writes what it saw to
``<folder>/rank-<r>.json``, the folder given as the one argument:

* the sharding: FSDP module, DTensor parameters, the embedding's local shard;
* a training step (forward, backward, accelerate's DTensor-aware ``clip_grad_norm_``, AdamW) against the same step on
  the unsharded copy, over both processes' data (the mean of the two processes' losses: FSDP2 averages gradients);
* :func:`align.fsdp2.gathered`: each process calls ``generate`` a different number of times for a different number of
  tokens and measures per-sequence gradient norms of a different number of sequences (no collective inside: a
  mismatch would hang, then time out); the norms against the unsharded copy's;
* EGPO's half-step snapshot and restore (:func:`align.trainers.egpo.snapshot` / ``restore``) with sharded optimizer
  state: bit for bit;
* the full state dict and the optimizer state in the 1-process format, loaded back exactly.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM

from align.fsdp2 import (
    full_state_dict,
    gathered,
    generate_kwargs,
    load_full_state_dict,
    load_optimizer_full_state,
    optimizer_full_state,
    shard,
)
from align.monitors.grad_norm import sequence_grad_norms
from align.monitors.gradients import select_parameters
from align.testbed.build import ensure_testbed
from align.trainers.egpo import restore, snapshot


def batch(rank: int) -> torch.Tensor:
    return torch.randint(2, 384, (2, 10), generator=torch.Generator().manual_seed(100 + rank))


def clip(params, max_norm: float) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    path = str(ensure_testbed(progress=False).policy)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = shard(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    emb = model.get_input_embeddings().weight
    out = {"fsdp_module": isinstance(model, FSDPModule),
           "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
           "all_dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
           "emb_global": list(emb.shape), "emb_local": list(emb.to_local().shape)}

    # one training step, sharded vs the unsharded copy on both processes' batches
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    ids = batch(rank)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out["grad_norm"] = float(clip(list(model.parameters()), 0.5))
    opt.step()
    ref_loss = sum(full(input_ids=batch(r), labels=batch(r)).loss for r in range(world)) / world
    ref_loss.backward()
    out["ref_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(full.parameters(), 0.5))
    ref_opt.step()
    state = full_state_dict(model)
    if rank == 0:
        ref = full.state_dict()
        out["step_max_diff"] = max((state[k] - ref[k]).abs().max().item() for k in ref)
        out["full_keys_equal"] = sorted(state) == sorted(ref)

    # gathered passes with a different amount of work per process
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]][: 1 + 2 * rank]
    completions = [[20, 21], [22, 23, 24], [25], [26, 27, 28, 29]][: 1 + 2 * rank]
    with gathered(model):
        model.eval()
        with torch.no_grad():  # process 1 calls generate twice, process 0 once (transformers' synced_gpus off)
            for _ in range(1 + rank):
                gen = model.generate(batch(rank)[:1, :4], max_new_tokens=2 + 5 * rank, min_new_tokens=2 + 5 * rank,
                                     do_sample=False, pad_token_id=0, **generate_kwargs(model))
        params = [p for _, p in select_parameters(model, ["embed_tokens", "layers.1."])]
        out["gathered_param_types"] = sorted({type(p).__name__ for p in params})
        norms = sequence_grad_norms(model, prompts, completions, 0, params, chunk=2)
        model.train()
    full_now = full_state_dict(model)
    sync = [None]
    if rank == 0:
        sync = [full_now]
    dist.broadcast_object_list(sync, src=0)
    full.load_state_dict(sync[0])
    full_params = [p for _, p in select_parameters(full, ["embed_tokens", "layers.1."])]
    out["norms"] = norms
    out["ref_norms"] = sequence_grad_norms(full, prompts, completions, 0, full_params, chunk=2)
    out["generated"] = gen.shape[1]
    out["sharded_after"] = all(type(p).__name__ == "DTensor" for p in model.parameters())

    # EGPO's half step: snapshot, an optimizer step, restore: each process's shards come back bit for bit
    params = list(model.parameters())
    local = [p.detach().to_local().clone() for p in params]
    moments = [opt.state[p][k].to_local().clone() for p in params for k in ("exp_avg", "exp_avg_sq")]
    steps = [opt.state[p]["step"].clone() for p in params]
    saved = snapshot(params, opt)
    ids = batch(rank + 2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    out["egpo_half_step_moved"] = not torch.equal(params[0].to_local(), local[0])
    restore(params, opt, saved)
    out["egpo_restore_exact"] = (
        all(torch.equal(p.to_local(), v) for p, v in zip(params, local))
        and all(torch.equal(opt.state[p][k].to_local(), v)
                for (p, k), v in zip([(p, k) for p in params for k in ("exp_avg", "exp_avg_sq")], moments))
        and all(torch.equal(opt.state[p]["step"], v) for p, v in zip(params, steps))
        and all(type(opt.state[p]["exp_avg"]).__name__ == "DTensor" for p in params))

    # state round trip: full weights and the optimizer state in the 1-process format, loaded into the shards
    saved_opt = optimizer_full_state(model, opt)
    if rank == 0:
        ref_sd = ref_opt.state_dict()
        out["opt_format"] = [sorted(saved_opt["state"]) == sorted(ref_sd["state"]),
                             [g["params"] for g in saved_opt["param_groups"]] == [g["params"] for g in
                                                                                   ref_sd["param_groups"]]]
        out["opt_max_diff"] = max((saved_opt["state"][i][k] - ref_sd["state"][i][k]).abs().max().item()
                                  for i in ref_sd["state"] for k in ("exp_avg", "exp_avg_sq"))
    sync = [saved_opt, full_now] if rank == 0 else [None, None]
    dist.broadcast_object_list(sync, src=0)
    model2 = shard(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    load_full_state_dict(model2, sync[1])
    load_optimizer_full_state(model2, opt2, sync[0])
    same = [torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters())]
    same_opt = [torch.equal(opt.state[a][k].to_local(), opt2.state[b][k].to_local())
                for a, b in zip(model.parameters(), model2.parameters()) for k in ("exp_avg", "exp_avg_sq")]
    out["reload_exact"] = all(same) and all(same_opt)
    with open(os.path.join(sys.argv[1], f"rank-{rank}.json"), "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
