"""Hinge (SLiC-HF): Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
(arXiv:2305.10425), in DPO's log-ratio form as TRL's ``loss_type="hinge"``. docs/methods.md §2.2.

    L = max(0, 1 − β·[h(y_w) − h(y_l)])
"""

import torch

from align.objectives.base import ObjectiveOutput, log_ratios, preference_metrics, register


@register("hinge", "SLiC-HF hinge on the DPO margin, max(0, 1 - beta * margin)", "arXiv:2305.10425")
def hinge(batch, *, beta: float = 0.1) -> ObjectiveOutput:
    h_w, h_l = log_ratios(batch)
    return ObjectiveOutput(torch.relu(1.0 - beta * (h_w - h_l)), preference_metrics(batch, beta))
