"""Pairwise-normalised DPO [recon]: the "normalized preference optimization" mitigation of gradient
entanglement suggested by Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment:
Gradient Entanglement" (arXiv:2410.13828). docs/methods.md §12.3; the exact formula is our working definition.

DPO's gradient is −βc·(g_w − g_l) with c = σ(−β·[h(y_w) − h(y_l)]). This objective keeps DPO's loss value
and weight c but updates along the normalised difference −βc·(g_w/‖g_w‖ − g_l/‖g_l‖). To first order over
the parameters the norms are taken on, Δlog π(y_w) ∝ ‖g_w‖(1 − cos) ≥ 0 and Δlog π(y_l) ∝ ‖g_l‖(cos − 1) ≤ 0:
the chosen log-prob cannot fall and the rejected cannot rise, whatever ⟨g_w, g_l⟩ is. The trainer supplies
the norms (``chosen_grad_norms``, ``rejected_grad_norms``) on its ``entanglement_params`` subset (lm_head by
default), a cheap surrogate for the full-parameter norms; the guarantee holds exactly on that subset.

    value:     L = −log σ(β·[h(y_w) − h(y_l)])                                   (DPO's)
    gradient:  ∇L = −β·σ(−β·[h(y_w) − h(y_l)])·(∇S_θ(y_w)/‖g_w‖ − ∇S_θ(y_l)/‖g_l‖)
"""

import torch

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss


@register("pairnorm", "DPO updating along g_w/|g_w| - g_l/|g_l| (entanglement mitigation) [recon]",
          "arXiv:2410.13828", needs=("grad_norms",))
def pairnorm(batch, *, beta: float = 0.1) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    margin = beta * (h_w - h_l)
    value = sigmoid_loss(margin)
    weight = beta * torch.sigmoid(-margin).detach()
    n_w = batch["chosen_grad_norms"].detach().clamp(min=1e-8)
    n_l = batch["rejected_grad_norms"].detach().clamp(min=1e-8)
    surrogate = -weight * (batch["policy_chosen_logps"] / n_w - batch["policy_rejected_logps"] / n_l)
    metrics = preference_metrics(batch, beta)
    metrics["pairnorm/grad_norm_ratio"] = (n_l / n_w).mean()
    return ObjectiveOutput(value.detach() + surrogate - surrogate.detach(), metrics)
