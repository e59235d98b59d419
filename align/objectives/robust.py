"""Robust DPO (rDPO): Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy
Feedback" (ICML 2024, arXiv:2403.00409). docs/methods.md §2.2.

    L = [−(1−ε)·log σ(βD) + ε·log σ(−βD)] / (1 − 2ε),   ε = label_smoothing (flip probability < 0.5)
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss


@register("robust", "Robust DPO for labels flipped with probability label_smoothing", "arXiv:2403.00409",
          bounds={"label_smoothing": "[0, 0.5)"})
def robust(batch, *, beta: float = 0.1, label_smoothing: float = 0.1) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    z = beta * (h_w - h_l)
    eps = label_smoothing
    losses = ((1.0 - eps) * sigmoid_loss(z) - eps * sigmoid_loss(-z)) / (1.0 - 2.0 * eps)
    return ObjectiveOutput(losses, preference_metrics(batch, beta))
