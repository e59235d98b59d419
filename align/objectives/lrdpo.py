"""Length-regularised DPO: "Iterative Length-Regularized Direct Preference Optimization: A Case
Study on Improving 7B Language Models to GPT-4 Level" (iLR-DPO, Liu et al., 2024);
the same form as R-DPO (Park et al., "Disentangling Length from Quality in DPO"). METHODS.md §7.

    L = −log σ( β·h(y_w) − β·h(y_l) − length_alpha·(|y_w| − |y_l|) )

[recon] METHODS.md's reconstruction of the paper's "preference margin and length margin"; lengths are
completion token counts in the policy's tokenizer.
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss


@register("lrdpo", "DPO with a length margin: beta * margin - length_alpha * (|y_w| - |y_l|)",
          "Iterative Length-Regularized DPO")
def lrdpo(batch, *, beta: float = 0.1, length_alpha: float = 0.01) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    length_gap = (batch["chosen_lengths"] - batch["rejected_lengths"]).to(h_w.dtype)
    metrics = preference_metrics(batch, beta)
    metrics["lrdpo/length_gap"] = length_gap.mean()
    return ObjectiveOutput(sigmoid_loss(beta * (h_w - h_l) - length_alpha * length_gap), metrics)
