"""Online IPO with a soft preference target: the loss whose gradients EGPO's extragradient steps follow.
Zhou et al., "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate Convergence for Nash Learning
from Human Feedback" (code: zhourunlong/EGPO, ``ExtragradientTrainer._compute_losses``); online IPO after
Calandriello et al., "Human Alignment of Large Language Models through Online Preference Optimisation"
(arXiv:2403.08635). docs/methods.md §6.

    L = ( (ℓ_θ(y) − ℓ_ref(y)) − (ℓ_θ(y′) − ℓ_ref(y′)) − g / β )²,   ℓ = S / |y|  (token-mean log-prob)

``g = batch["preference_gap"]``: P(y ≻ y″) − P(y′ ≻ y″) against one opponent sample y″ ("online IPO 1"), or
P(y ≻ y′) − ½ ("online IPO 2", the lower-variance form). The first response sits in the ``chosen`` slots and
the second in the ``rejected`` slots, whatever the preference says. With g = ½ this is IPO on a hard label.
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register


@register("online_ipo", "Online IPO: (token-mean log-ratio gap - preference_gap / beta)^2 (EGPO's loss)",
          "EGPO (zhourunlong/EGPO); arXiv:2403.08635", needs=("preference_gap",))
def online_ipo(batch, *, beta: float = 0.1) -> ObjectiveOutput:
    h_1, h_2 = log_ratios(batch)
    gap = h_1 / batch["chosen_lengths"] - h_2 / batch["rejected_lengths"]
    target = batch["preference_gap"].to(gap.dtype) / beta
    metrics = preference_metrics(batch, beta)
    metrics["online_ipo/target"] = target.detach().mean()
    metrics["online_ipo/mean_gap"] = gap.detach().mean()
    return ObjectiveOutput((gap - target) ** 2, metrics)
