"""The gvm allocator: estimate (p_i, G_i) where stale, then spread the round's budget (docs/methods.md §13.2-13.3).

The budget is N = ``num_generations`` × prompts; the rule itself is :func:`align.sampling.gvm.gvm_allocate`.
With every count 0 (all prompts unsolved or without gradient) the round falls back to uniform (warned).
With ``gvm_reuse_samples`` the estimation samples are trained on too, and only the rest is generated.
"""

from __future__ import annotations

import logging
import statistics

from align.sampling.allocators.base import ALLOCATORS, Allocation, RoundContext
from align.sampling.gvm import gvm_allocate, uniform_allocate

logger = logging.getLogger(__name__)


@ALLOCATORS.register("gvm", "a budget of num_generations x prompts spread by (p_i, G_i) estimates")
def gvm(rows: list[dict], index: int, ctx: RoundContext) -> Allocation:
    a = ctx.args
    metrics: dict[str, float] = {}
    stale = [i for i, r in enumerate(rows) if ctx.stats.is_stale(r["uid"], index, a.gvm_interval)]
    est: list = []
    if stale:
        stale_set = set(stale)
        est = ctx.generate(rows, [a.gvm_samples if i in stale_set else 0 for i in range(len(rows))], f"e{index}")
        metrics.update(ctx.estimate(rows, est, index, "gvm"))
        metrics["gvm/estimated_prompts"] = float(len(stale))
    p = [ctx.stats.get(r["uid"])["accept_rate"] for r in rows]
    g = [ctx.stats.get(r["uid"])["grad_norm"] for r in rows]
    counts = gvm_allocate(p, g, a.num_generations * len(rows), alpha=a.gvm_alpha, beta=a.gvm_beta,
                          filter_threshold=a.gvm_filter_threshold, filter_insufficient=a.gvm_filter_insufficient,
                          min_n=a.gvm_min_n, max_n=a.gvm_max_n)
    metrics["allocation/fallback"] = 0.0
    if sum(counts) == 0:
        logger.warning("GVM gave every prompt 0 rollouts (all unsolved or zero gradient): uniform this round")
        counts = uniform_allocate(len(rows), a.num_generations)
        metrics["allocation/fallback"] = 1.0
    metrics.update({"gvm/p_mean": statistics.fmean(p), "gvm/p_zero": sum(x == 0 for x in p) / len(p),
                    "gvm/p_one": sum(x == 1 for x in p) / len(p), "gvm/G_mean": statistics.fmean(g),
                    "gvm/G_max": max(g)})
    reused: list = []
    if a.gvm_reuse_samples and est:
        for i, n in enumerate(counts):
            reused += [s for s in est if s.g == i][:n]
    have = [0] * len(rows)
    for s in reused:
        have[s.g] += 1
    samples = reused + ctx.generate(rows, [max(n - h, 0) for n, h in zip(counts, have)], f"r{index}",
                                    k_offset=a.gvm_samples)
    samples.sort(key=lambda s: (s.g, s.k))
    return Allocation(rows, counts, samples, metrics)
