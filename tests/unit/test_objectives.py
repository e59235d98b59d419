"""Each objective on hand-checked numbers.

The batch: S_θ(y_w) = −10, S_θ(y_l) = −12, S_ref(y_w) = S_ref(y_l) = −11, |y_w| = 5, |y_l| = 4,
so h(y_w) = 1, h(y_l) = −1 and Δ = 2. With β = 0.5, βΔ = 1 and −log σ(1) = log(1 + e^−1) = 0.3132617.
"""

import math

import pytest
import torch

from align.errors import ConfigError
from align.objectives import build, registry


def batch(**kw):
    b = {
        "policy_chosen_logps": torch.tensor([-10.0]),
        "policy_rejected_logps": torch.tensor([-12.0]),
        "ref_chosen_logps": torch.tensor([-11.0]),
        "ref_rejected_logps": torch.tensor([-11.0]),
        "chosen_lengths": torch.tensor([5.0]),
        "rejected_lengths": torch.tensor([4.0]),
    }
    b.update({k: torch.tensor([v]) for k, v in kw.items()})
    return b


SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # −log σ(1) = 0.3132617


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("dpo", dict(beta=0.5), 0.3132617),
        # IPO: token-mean margin 1/5 − (−1/4) = 0.45, target 1/(2·0.5) = 1 → (0.45 − 1)² = 0.3025
        ("ipo", dict(beta=0.5), 0.3025),
        ("hinge", dict(beta=0.25), 0.5),  # max(0, 1 − 0.25·2)
        ("hinge", dict(beta=0.5), 0.0),  # exactly on the hinge
        # rDPO: [0.9·0.3132617 − 0.1·log(1 + e)] / 0.8 = (0.2819355 − 0.1313262) / 0.8
        ("robust", dict(beta=0.5, label_smoothing=0.1), 0.1882617),
        ("robust", dict(beta=0.5, label_smoothing=0.0), 0.3132617),  # ε = 0 is DPO
        # RPO sum: DPO − η·β·S_θ(y_w) = 0.3132617 − 0.1·0.5·(−10) = 0.8132617
        ("rpo", dict(beta=0.5, eta=0.1, sft_norm="sum"), 0.8132617),
        # RPO mean: DPO + η·(10/5) = 0.3132617 + 0.2
        ("rpo", dict(beta=0.5, eta=0.1, sft_norm="mean"), 0.5132617),
        # H-DPO: α·β·(−10 + 12) − β·0 = 0.5 → log(1 + e^−0.5)
        ("hdpo", dict(beta=0.5, alpha=0.5), 0.4740770),
        ("hdpo", dict(beta=0.5, alpha=1.0), 0.3132617),  # α = 1 is DPO
        # LR-DPO: 1 + 0.1·(5 − 4) = 1.1 → log(1 + e^−1.1) (a longer chosen needs a smaller margin)
        ("lrdpo", dict(beta=0.5, length_alpha=0.1), 0.2873353),
        ("lrdpo", dict(beta=0.5, length_alpha=0.0), 0.3132617),
    ],
)
def test_hand_checked_loss(name, params, expected):
    out = build(name, **params)(batch())
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)


def test_softplus_constant():
    assert SOFTPLUS_M1 == pytest.approx(0.3132617, abs=1e-7)


def test_hdpo_scales_policy_not_reference():
    # Reference margin −1 (S_ref(y_w) = −11, S_ref(y_l) = −10); policy margin 2; α = 0.5, β = 1:
    # logits = 0.5·1·2 − 1·(−1) = 2; DPO would give 1·(2 − (−1)) = 3.
    b = batch(ref_rejected_logps=-10.0)
    assert build("hdpo", beta=1.0, alpha=0.5)(b).losses.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    assert build("dpo", beta=1.0)(b).losses.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-6)
    # At θ = ref the H-DPO logit is (α − 1)·β·(S_ref(y_w) − S_ref(y_l)), not 0 (docs/methods.md §4 pitfall).
    at_ref = batch(policy_chosen_logps=-11.0, policy_rejected_logps=-10.0, ref_rejected_logps=-10.0)
    logit = (0.5 - 1) * 1.0 * (-1.0)
    assert build("hdpo", beta=1.0, alpha=0.5)(at_ref).losses.item() == pytest.approx(math.log1p(math.exp(-logit)))


def test_common_metrics():
    m = build("dpo", beta=0.5)(batch()).metrics
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -10.0 and m["logps/rejected"].item() == -12.0
    # H-DPO logs β·h, not α-scaled, so its rewards compare with DPO's
    assert build("hdpo", beta=0.5, alpha=0.5)(batch()).metrics["rewards/chosen"].item() == pytest.approx(0.5)


def test_gradient_flows_to_policy_only():
    b = batch()
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        b[k].requires_grad_(True)
    build("dpo", beta=0.5)(b).losses.sum().backward()
    # d/dS_w of −log σ(β(S_w − S_l + c)) = −β·σ(−βΔ) = −0.5·σ(−1)
    assert b["policy_chosen_logps"].grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)
    assert b["policy_rejected_logps"].grad.item() == pytest.approx(0.5 / (1 + math.e), abs=1e-6)


def test_batched_per_example_losses():
    b = {k: torch.cat([v, v]) for k, v in batch().items()}
    b["policy_chosen_logps"] = torch.tensor([-10.0, -12.0])  # second pair: Δ = 0 → log 2
    out = build("dpo", beta=0.5)(b)
    assert out.losses.tolist() == pytest.approx([0.3132617, math.log(2)], abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.5


def test_registry_lists_every_objective_with_params():
    reg = registry()
    assert set(reg) >= {"dpo", "ipo", "hinge", "robust", "rpo", "hdpo", "lrdpo"}
    assert reg["hdpo"].params == {"beta": 0.1, "alpha": 0.95}
    assert reg["rpo"].params == {"beta": 0.1, "eta": 0.005, "sft_norm": "sum"}


def test_unknown_objective_and_parameter():
    with pytest.raises(ConfigError, match="unknown objective 'dpoo'"):
        build("dpoo")
    with pytest.raises(ConfigError, match="objective 'dpo' does not take 'alpha'"):
        build("dpo", alpha=0.9)
    with pytest.raises(ConfigError, match="sft_norm"):
        build("rpo", sft_norm="median")(batch())
    with pytest.raises(ConfigError, match="label_smoothing"):
        build("robust", label_smoothing=0.5)(batch())


def test_pairnorm_keeps_dpo_value_and_normalises_the_gradient():
    # ‖g_w‖ = 2, ‖g_l‖ = 4: the loss value is DPO's 0.3132617; d/dS_w = −β·σ(−βΔ)/‖g_w‖ = −0.5·σ(−1)/2,
    # d/dS_l = +0.5·σ(−1)/4 (DPO's weights divided by each sequence's gradient norm).
    b = batch(chosen_grad_norms=2.0, rejected_grad_norms=4.0)
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        b[k].requires_grad_(True)
    out = build("pairnorm", beta=0.5)(b)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-6)
    out.losses.sum().backward()
    assert b["policy_chosen_logps"].grad.item() == pytest.approx(-0.5 / (1 + math.e) / 2, abs=1e-7)
    assert b["policy_rejected_logps"].grad.item() == pytest.approx(0.5 / (1 + math.e) / 4, abs=1e-7)
    assert out.metrics["pairnorm/grad_norm_ratio"].item() == pytest.approx(2.0)
    assert registry()["pairnorm"].needs == ("grad_norms",)


@pytest.mark.parametrize("gap, expected", [
    (0.5, 0.3025),  # a hard label: target 0.5/0.5 = 1, as IPO with τ = β → (0.45 − 1)²
    (0.2, 0.0025),  # target 0.4 → (0.45 − 0.4)²
    (-0.25, 0.9025),  # the second response preferred: target −0.5 → (0.45 + 0.5)²
    (0.0, 0.2025),  # a tie: the token-mean log-ratio gap is pulled to 0 → 0.45²
])
def test_online_ipo_soft_target(gap, expected):
    out = build("online_ipo", beta=0.5)(batch(preference_gap=gap))
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["online_ipo/target"].item() == pytest.approx(gap / 0.5)
    assert registry()["online_ipo"].needs == ("preference_gap",)
