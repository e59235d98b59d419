"""DPO: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (NeurIPS 2023, arXiv:2305.18290). docs/methods.md §2.1.

    L = −log σ(β·[h(y_w) − h(y_l)]),   h(y) = S_θ(y|x) − S_ref(y|x)   (summed log-probs)
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss


@register("dpo", "Direct Preference Optimization, -log sigmoid(beta * margin)", "arXiv:2305.18290")
def dpo(batch, *, beta: float = 0.1) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    return ObjectiveOutput(sigmoid_loss(beta * (h_w - h_l)), preference_metrics(batch, beta))
