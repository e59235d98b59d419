"""Length-regularised DPO: "Iterative Length-Regularized Direct Preference Optimization: A Case
Study on Improving 7B Language Models to GPT-4 Level" (iLR-DPO, Liu et al., 2024);
the same form as R-DPO (Park et al., "Disentangling Length from Quality in DPO"). docs/methods.md §7.

    L = −log σ( β·h(y_w) − β·h(y_l) + length_alpha·(|y_w| − |y_l|) )

[recon] The paper's "preference margin and length margin"; lengths are completion token counts in the policy's
tokenizer. The sign is R-DPO's (and MODPO's with the length reward −|y|): the optimum of this loss under a
Bradley–Terry preference r is β·h(y) = r(y) − length_alpha·|y|, so length_alpha > 0 penalises length. A chosen
response longer than the rejected one already "explains" part of its win, and the pair pushes less.
docs/methods.md §7 writes −length_alpha·(|y_w| − |y_l|): with that sign the optimum is r(y) + length_alpha·|y|,
which rewards length; on the testbed it did not slow length growth at all (docs/benchmarks.md, iLR-DPO).
"""

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss


@register("lrdpo", "DPO with a length margin: beta * margin + length_alpha * (|y_w| - |y_l|)",
          "Iterative Length-Regularized DPO")
def lrdpo(batch, *, beta: float = 0.1, length_alpha: float = 0.01) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    length_gap = (batch["chosen_lengths"] - batch["rejected_lengths"]).to(h_w.dtype)
    metrics = preference_metrics(batch, beta)
    metrics["lrdpo/length_gap"] = length_gap.mean()
    return ObjectiveOutput(sigmoid_loss(beta * (h_w - h_l) + length_alpha * length_gap), metrics)
