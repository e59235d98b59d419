"""The allocator contract: how many rollouts each prompt of a round gets, and generating them.

An allocator is a function registered by name (the config's ``allocator``)::

    @ALLOCATORS.register("uniform", "num_generations completions for every prompt")
    def uniform(rows, index, ctx: RoundContext) -> Allocation: ...

``rows`` are the round's prompts (every process's, gathered), ``index`` the round number, and ``ctx`` what
an allocator may use: the config, the per-prompt statistics, the train dataset, and two callbacks of the
round builder. ``ctx.generate(rows, counts, tag, k_offset=0)`` generates and scores ``counts[i]``
completions of ``rows[i]`` and returns every sample in order (g, k) (each has ``.g``, the index of its row,
``.k`` and ``.reward``); ``tag`` keys the random streams, so an allocator keeps its tags fixed (``f"r{index}"``
for the round's own rollouts). ``ctx.estimate(rows, samples, index, prefix)`` measures each prompt's
acceptance rate p_i and gradient scale G_i into ``ctx.stats`` and returns ``<prefix>/*`` metrics.

Every process calls the allocator with the same arguments and must reach the same counts (the callbacks
gather what they measure), so an allocator decides only from gathered data and seeded generators.
A new allocator is one module in this package (found by name, no other edit) plus its test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from align.registry import Registry
from align.sampling.stats import PromptStats

ALLOCATORS = Registry("allocator", package="align.sampling.allocators")


@dataclass
class RoundContext:
    args: Any  # the RL config (num_generations, the allocator's own keys, seed, ...)
    stats: PromptStats
    dataset: Sequence[dict]  # the train dataset, for allocators that draw more prompts
    generate: Callable[..., list]  # generate(rows, counts, tag, k_offset=0) -> samples in order (g, k)
    estimate: Callable[..., dict[str, float]]  # estimate(rows, samples, index, prefix) -> metrics


@dataclass
class Allocation:
    rows: list[dict]  # the prompts trained on (an allocator may add some)
    counts: list[int]  # rollouts per row (0: the row is dropped)
    samples: list  # the samples to train on, in order (g, k)
    metrics: dict[str, float] = field(default_factory=dict)
