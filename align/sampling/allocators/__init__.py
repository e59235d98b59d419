"""Allocators, chosen by the config's ``allocator`` name: uniform, gvm, dynamic (one module each).

    from align.sampling.allocators import ALLOCATORS
    allocation = ALLOCATORS.get(args.allocator).fn(rows, index, ctx)

The contract (:class:`RoundContext` in, :class:`Allocation` out) is in :mod:`align.sampling.allocators.base`.
"""

from align.sampling.allocators.base import ALLOCATORS, Allocation, RoundContext

__all__ = ["ALLOCATORS", "Allocation", "RoundContext"]
