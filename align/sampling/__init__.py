"""Per-prompt sampling: GVM budget allocation, DAPO dynamic-sampling filters, per-prompt statistics.

These are the pure parts; the allocators that use them in a round, chosen by name, are in
:mod:`align.sampling.allocators`.
"""

from align.sampling.dynamic import nonzero_variance_groups, select_groups
from align.sampling.gvm import gvm_allocate, gvm_weights, round_preserving_sum, uniform_allocate
from align.sampling.stats import PromptStats

__all__ = [
    "PromptStats",
    "gvm_allocate",
    "gvm_weights",
    "nonzero_variance_groups",
    "round_preserving_sum",
    "select_groups",
    "uniform_allocate",
]
