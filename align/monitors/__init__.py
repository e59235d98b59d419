"""Monitors: measurements of training that are logged and fed back into sampling."""

from align.monitors.grad_norm import sequence_grad_norms
from align.monitors.gradients import select_parameters

__all__ = ["select_parameters", "sequence_grad_norms"]
