"""Per-sequence gradient norms: GVM's G_i estimator (docs/methods.md §13.3), usable as a monitor.

For a sequence y of prompt x, the norm ‖∇_φ S_θ(y|x)‖₂ of the gradient of its **summed** completion
log-prob with respect to a parameter subset φ (by default the input embedding matrix, as GVM's code:
``act_params = embed_tokens``). G_i is the mean of this norm over prompt i's accepted samples. The gradients
are exact, one sequence at a time (:func:`align.monitors.gradients.sequence_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align import progress
from align.monitors.gradients import sequence_grads


def sequence_grad_norms(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                        params: Sequence[torch.nn.Parameter], chunk: int = 8,
                        block_size: int | str = "auto") -> list[float]:
    """‖∇_params S_θ(completion | prompt)‖₂ for each (prompt, completion) pair, in order. ``block_size``: the run's
    ``logits_block_size``."""
    norms = []
    for g, _ in sequence_grads(model, prompts, completions, pad_id, params, chunk, block_size):
        norms.append(float(g.norm()))
        progress.advance(1, "samples")  # the open stage's bar (GVM estimation), if any
    return norms
