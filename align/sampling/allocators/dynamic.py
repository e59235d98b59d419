"""The dynamic allocator: DAPO dynamic sampling (the pure filters are in :mod:`align.sampling.dynamic`).

Keep the groups whose rewards differ; replace the others with fresh prompts drawn from the train dataset
for up to ``dynamic_max_rounds`` extra rounds; with none kept at the end, train on everything (warned).
"""

from __future__ import annotations

import logging

import torch

from align.sampling.allocators.base import ALLOCATORS, Allocation, RoundContext
from align.sampling.dynamic import nonzero_variance_groups, select_groups
from align.sampling.gvm import uniform_allocate

logger = logging.getLogger(__name__)


@ALLOCATORS.register("dynamic", "num_generations each, zero-variance groups replaced by fresh prompts")
def dynamic(rows: list[dict], index: int, ctx: RoundContext) -> Allocation:
    a = ctx.args
    m = len(rows)
    samples = ctx.generate(rows, uniform_allocate(m, a.num_generations), f"r{index}")
    kept = nonzero_variance_groups([s.reward for s in samples], [s.g for s in samples])
    extra = 0
    while len(kept) < m and extra < a.dynamic_max_rounds:
        extra += 1
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + index * 101 + extra)
        picks = torch.randint(len(ctx.dataset), (m - len(kept),), generator=gen).tolist()
        new_rows = [ctx.dataset[i] for i in picks]
        more = ctx.generate(rows + new_rows, [0] * len(rows) + uniform_allocate(len(new_rows), a.num_generations),
                            f"r{index}x{extra}")
        rows = rows + new_rows
        samples = samples + more
        kept = nonzero_variance_groups([s.reward for s in samples], [s.g for s in samples])
    metrics = {"dynamic/extra_rounds": float(extra), "dynamic/all_zero_variance": float(not kept)}
    if not kept:
        logger.warning("dynamic sampling: every group has identical rewards after %d extra rounds; training on "
                       "the unfiltered batch (zero advantages)", extra)
        kept = list(range(m))
    keep = set(select_groups(kept, m))
    counts = [a.num_generations if i in keep else 0 for i in range(len(rows))]
    return Allocation(rows, counts, [s for s in samples if s.g in keep], metrics)
