"""Per-sequence gradient norms: GVM's G_i estimator (docs/methods.md §13.3), usable as a monitor.

For a sequence y of prompt x, the norm ‖∇_φ S_θ(y|x)‖₂ of the gradient of its **summed** completion
log-prob with respect to a parameter subset φ (by default the input embedding matrix, as GVM's code:
``act_params = embed_tokens``). G_i is the mean of this norm over prompt i's accepted samples. The gradients
are exact, one sequence at a time (:func:`align.monitors.gradients.sequence_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.monitors.gradients import sequence_grads


def sequence_grad_norms(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                        params: Sequence[torch.nn.Parameter], chunk: int = 8) -> list[float]:
    """‖∇_params S_θ(completion | prompt)‖₂ for each (prompt, completion) pair, in order."""
    return [float(g.norm()) for g, _ in sequence_grads(model, prompts, completions, pad_id, params, chunk)]
