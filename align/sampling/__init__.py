"""Per-prompt sampling: GVM budget allocation, DAPO dynamic-sampling filters, per-prompt statistics."""

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
