"""Monitors: measurements of training that are logged and fed back into sampling."""

from align.monitors.grad_norm import select_parameters, sequence_grad_norms

__all__ = ["select_parameters", "sequence_grad_norms"]
