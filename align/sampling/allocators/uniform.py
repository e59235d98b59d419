"""The uniform allocator: ``num_generations`` completions for every prompt (GRPO's fixed group size)."""

from __future__ import annotations

from align.sampling.allocators.base import ALLOCATORS, Allocation, RoundContext
from align.sampling.gvm import uniform_allocate


@ALLOCATORS.register("uniform", "num_generations completions for every prompt")
def uniform(rows: list[dict], index: int, ctx: RoundContext) -> Allocation:
    counts = uniform_allocate(len(rows), ctx.args.num_generations)
    return Allocation(rows, counts, ctx.generate(rows, counts, f"r{index}"))
