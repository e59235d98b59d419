"""RPO: Liu et al., "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
Adversarial Regularizer" (NeurIPS 2024, arXiv:2405.16436). docs/methods.md §3.

* ``sft_norm="sum"`` (the paper's main text): L = L_DPO − η·β·S_θ(y_w)   (summed chosen log-prob)
* ``sft_norm="mean"`` (Appendix F / OpenRLHF): L = L_DPO + η·NLL_mean(y_w) = L_DPO − η·S_θ(y_w)/|y_w|,
  each chosen answer's token-mean NLL, averaged over the batch's pairs
* ``sft_norm="token"`` (TRL 1.16, ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, η]``): one token mean over
  all chosen tokens of the batch, L = L_DPO + η·(−Σ_i S_θ(y_w,i) / Σ_i |y_w,i|); equals ``mean`` when every
  chosen answer of the batch has the same length, else weighs long answers more

The two need very different η (about 100x apart). Paper defaults: sum, η = 0.005, β = 0.01.
"""

from align.errors import ConfigError
from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register, sigmoid_loss

SFT_NORMS = ("sum", "mean", "token")


@register("rpo", "DPO plus an SFT term on the chosen response (eta; sft_norm sum|mean|token)", "arXiv:2405.16436",
          bounds={"eta": "[0, inf)", "sft_norm": SFT_NORMS})
def rpo(batch, *, beta: float = 0.1, eta: float = 0.005, sft_norm: str = "sum") -> ObjectiveOutput:
    if sft_norm not in SFT_NORMS:
        raise ConfigError(f"sft_norm: must be one of {SFT_NORMS}, got {sft_norm!r}")
    h_w, h_l = log_ratios(batch)
    dpo = sigmoid_loss(beta * (h_w - h_l))
    chosen = batch["policy_chosen_logps"]
    if sft_norm == "sum":
        sft = -eta * beta * chosen
        nll = -chosen
    elif sft_norm == "mean":
        nll = -chosen / batch["chosen_lengths"]
        sft = eta * nll
    else:  # one batch-level token mean, spread over the pairs as TRL does: their mean is that scalar
        nll = (-chosen.sum() / batch["chosen_lengths"].sum()).expand(chosen.shape[0])
        sft = eta * nll
    metrics = preference_metrics(batch, beta)
    metrics["rpo/dpo_loss"] = dpo.detach().mean()
    metrics["rpo/sft_nll"] = nll.detach().mean()
    return ObjectiveOutput(dpo + sft, metrics)
