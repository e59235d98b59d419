"""H-DPO: "Entropy Controllable Direct Preference Optimization" (Omura et al., 2024).
docs/methods.md §4.

    L = −log σ( α·β·(S_θ(y_w) − S_θ(y_l)) − β·(S_ref(y_w) − S_ref(y_l)) )

α scales the policy log-probs only, never the reference's; α = 1 is DPO, α < 1 sharpens (lower
entropy), α > 1 spreads. [recon] The loss is docs/methods.md's reconstruction of the paper's derivation
(π* ∝ π_ref^{1/α}·exp(r/(αβ))), not checked against the paper's full text. The logged implicit
rewards stay β·h (not α-scaled) so they compare with DPO's.
"""

from align.objectives.base import ObjectiveOutput, preference_metrics, register, sigmoid_loss


@register("hdpo", "Entropy-controllable DPO: alpha scales the policy log-probs (alpha=1 is DPO)",
          "Entropy Controllable Direct Preference Optimization", bounds={"alpha": "(0, inf)"})
def hdpo(batch, *, beta: float = 0.1, alpha: float = 0.95) -> ObjectiveOutput:
    policy = batch["policy_chosen_logps"] - batch["policy_rejected_logps"]
    ref = batch["ref_chosen_logps"] - batch["ref_rejected_logps"]
    logits = alpha * beta * policy - beta * ref
    metrics = preference_metrics(batch, beta)
    metrics["hdpo/logits"] = logits.detach().mean()
    return ObjectiveOutput(sigmoid_loss(logits), metrics)
