"""Run by test_sharded_configs.py under ``torch.distributed.run --nproc_per_node 2`` (gloo, DeepSpeed's CPU
accelerator): the testbed policy loaded as ZeRO-3 loads it (transformers' ``zero.Init`` through an
``HfDeepSpeedConfig``), so each process holds a slice of every weight; then the completion log-probs of a few
sequences with :func:`align.sharding.full_weights` against the unpartitioned model. Each process writes its results
to ``<folder>/rank-<r>.json``, the folder given as the one argument."""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from align.logps import token_logps
from align.sharding import full_weights
from align.testbed.build import ensure_testbed


def partitioned(model) -> bool:
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    path = str(ensure_testbed(progress=False).policy)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    sliced = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 23, 42, 8, 3, 11, 29], [7, 7, 19, 2, 31, 4, 9, 12]])
    attn = torch.ones_like(ids)
    before = partitioned(sliced)
    try:
        with torch.no_grad():
            sliced(input_ids=ids)
        error = None
    except RuntimeError as err:
        error = str(err)
    with torch.no_grad():
        want = token_logps(full, ids, attn, 3)
        with full_weights(sliced, torch.device("cpu")):
            got = token_logps(sliced, ids, attn, 3)
    result = {"rank": dist.get_rank(), "partitioned_before": before, "partitioned_after": partitioned(sliced),
              "ungathered_error": error, "max_abs_diff": (got - want).abs().max().item(), "logps": got.sum(-1).tolist()}
    with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
