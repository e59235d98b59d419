"""IPO: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences"
(AISTATS 2024, arXiv:2310.12036). docs/methods.md §2.3.

    L = (D̄ − 1/(2τ))²,   D̄ = h(y_w)/|y_w| − h(y_l)/|y_l|   (log-ratios averaged per token, as TRL)

``beta`` plays the role of τ.
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register


@register("ipo", "Identity Preference Optimization, (token-mean margin - 1/(2 beta))^2", "arXiv:2310.12036")
def ipo(batch, *, beta: float = 0.1) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    margin = h_w / batch["chosen_lengths"] - h_l / batch["rejected_lengths"]
    metrics = preference_metrics(batch, beta)
    metrics["ipo/mean_margin"] = margin.detach().mean()
    return ObjectiveOutput((margin - 1.0 / (2.0 * beta)) ** 2, metrics)
