"""The two places where align's losses and TRL 1.16's differ by default (docs/methods.md §3 and §11), each on
hand-computed numbers and against TRL's own loss code on the same tensors (trl is pinned to 1.16.0).

TRL's losses are methods of its trainers that start from a forward pass; they run here with a stub ``self``
holding only the attributes the loss path reads and a stub model (or log-prob function) returning the
hand-picked log-probs, so the rest is TRL's code, unchanged:

* ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py: ``loss_type == "sft"`` at lines 1495-1502, summed into
  the loss with its weight at line 1528), in the fast lane;
* ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py: ρ at 3083-3095, the KL and
  ``use_bias_correction_kl`` at 3100-3105, the clipped surrogate at 3113-3120, + β·KL at 3150, the ``grpo`` /
  ``bnpo`` aggregations at 3153-3160). Importing GRPOTrainer imports vLLM (~20-35 s), so the fast lane compares
  align with :func:`trl_grpo_formula`, those lines transcribed, and one slow test checks the transcription
  against TRL's method itself.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError
from align.objectives import build, policy_loss
from align.recipe import get_recipe, main

F64 = torch.float64

# --- RPO: sft_norm mean (align: per-answer token mean, averaged) vs token (TRL: one token mean of the batch) ---

# Two pairs; chosen answers of 2 and 4 tokens, rejected answers of 3 tokens; per-token policy log-probs:
CHOSEN_TOKENS = ([-0.5, -1.5], [-1.0, -0.5, -2.5, -2.0])  # S_θ(y_w) = −2, −6; token means 1.0, 1.5
REJECTED_TOKENS = ([-1.0, -1.0, -1.0], [-2.0, -1.5, -2.0])  # S_θ(y_l) = −3, −5.5
REF_CHOSEN, REF_REJECTED = [-3.0, -6.5], [-2.0, -5.0]
# h_w = [−2 + 3, −6 + 6.5] = [1, 0.5], h_l = [−3 + 2, −5.5 + 5] = [−1, −0.5], Δ = [2, 1].
BETA, ETA = 0.5, 0.1  # βΔ = [1, 0.5]
DPO = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(-0.5))]  # −log σ(βΔ) = [0.3132617, 0.4740770]


def rpo_batch():
    return {
        "policy_chosen_logps": torch.tensor([sum(t) for t in CHOSEN_TOKENS], dtype=F64, requires_grad=True),
        "policy_rejected_logps": torch.tensor([sum(t) for t in REJECTED_TOKENS], dtype=F64),
        "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=F64),
        "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=F64),
        "chosen_lengths": torch.tensor([2.0, 4.0], dtype=F64),
        "rejected_lengths": torch.tensor([3.0, 3.0], dtype=F64),
    }


@pytest.mark.parametrize(
    "sft_norm, per_pair, grad_chosen",
    [
        # mean: η · each answer's token-mean NLL: 0.1·[2/2, 6/4] = [0.1, 0.15]; the batch mean adds 0.125.
        # d/dS_i of the batch mean: −η / (B·|y_w,i|) = −0.1/(2·2), −0.1/(2·4)
        ("mean", [DPO[0] + 0.1, DPO[1] + 0.15], [-0.025, -0.0125]),
        # token (TRL): η · (2 + 6)/(2 + 4) = 0.1·4/3 on every pair; d/dS_i = −η/Σ|y_w| = −0.1/6 for both
        ("token", [DPO[0] + 0.4 / 3, DPO[1] + 0.4 / 3], [-0.1 / 6, -0.1 / 6]),
        # sum (paper): −η·β·S_θ(y_w) = 0.05·[2, 6] = [0.1, 0.3]; d/dS_i = −η·β/B = −0.025
        ("sum", [DPO[0] + 0.1, DPO[1] + 0.3], [-0.025, -0.025]),
    ],
)
def test_rpo_sft_norm_on_hand_computed_values(sft_norm, per_pair, grad_chosen):
    batch = rpo_batch()
    out = build("rpo", beta=BETA, eta=ETA, sft_norm=sft_norm)(batch)
    assert out.losses.tolist() == pytest.approx(per_pair, abs=1e-12)
    out.losses.mean().backward()
    # the DPO part's own gradient, −β·σ(−βΔ)/B per pair, is the same for every variant: remove it
    dpo_grad = [-BETA * (1 - 1 / (1 + math.exp(-x))) / 2 for x in (1.0, 0.5)]
    sft_grad = (batch["policy_chosen_logps"].grad - torch.tensor(dpo_grad, dtype=F64)).tolist()
    assert sft_grad == pytest.approx(grad_chosen, abs=1e-12)
    nll = {"mean": 1.25, "token": 4 / 3, "sum": 4.0}[sft_norm]  # rpo/sft_nll: the NLL each form penalises
    assert out.metrics["rpo/sft_nll"].item() == pytest.approx(nll, abs=1e-12)


def test_rpo_mean_and_token_differ_only_with_unequal_lengths():
    batch = rpo_batch()
    mean = build("rpo", beta=BETA, eta=ETA, sft_norm="mean")(batch).losses.mean().item()
    token = build("rpo", beta=BETA, eta=ETA, sft_norm="token")(batch).losses.mean().item()
    assert token - mean == pytest.approx(ETA * (4 / 3 - 1.25), abs=1e-12)  # 0.1·(1/12) = 0.0083333
    batch["chosen_lengths"] = torch.tensor([3.0, 3.0], dtype=F64)  # same lengths: both are 8/6
    mean = build("rpo", beta=BETA, eta=ETA, sft_norm="mean")(batch).losses.mean().item()
    token = build("rpo", beta=BETA, eta=ETA, sft_norm="token")(batch).losses.mean().item()
    assert mean == pytest.approx(token, abs=1e-15)


def trl_dpo_sft_loss(eta: float) -> tuple[float, list[float]]:
    """TRL's loss with ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, η]`` on the same pairs, and its
    gradient w.r.t. the summed chosen log-probs (each chosen token's gradient, which TRL's loss sees)."""
    width = 5  # completion positions after the shift; row layout [chosen 1, chosen 2, rejected 1, rejected 2]
    rows = [*CHOSEN_TOKENS, *REJECTED_TOKENS]
    token_logps = torch.zeros(4, width, dtype=F64)
    completion_mask = torch.zeros(4, width + 1, dtype=torch.long)  # position 0 is the prompt
    for i, toks in enumerate(rows):
        token_logps[i, : len(toks)] = torch.tensor(toks, dtype=F64)
        completion_mask[i, 1 : 1 + len(toks)] = 1
    token_logps.requires_grad_(True)

    def model(**kwargs):  # the fused LM head's outputs: log-probs of the labels, 0 off the completion
        assert kwargs["fused_lm_head"] is True
        zeros = torch.zeros(4, width, dtype=F64)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(4, width, dtype=torch.bool), aux_loss=None)

    identity = lambda x: x  # noqa: E731  (one process: gathers are the identity)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                           gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"], loss_weights=[1.0, eta], beta=BETA, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(4, width + 1, dtype=torch.long), "attention_mask": torch.ones(4, width + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=F64),
              "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=F64)}
    from trl import DPOTrainer  # here, not at collection: a few seconds

    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), token_logps.grad


def test_rpo_token_is_trl_dpo_with_sft_loss():
    trl_loss, trl_token_grad = trl_dpo_sft_loss(ETA)
    assert trl_loss == pytest.approx(sum(DPO) / 2 + ETA * 4 / 3, abs=1e-12)  # hand value: 0.5270027
    batch = rpo_batch()
    ours = build("rpo", beta=BETA, eta=ETA, sft_norm="token")(batch).losses.mean()
    assert ours.item() == pytest.approx(trl_loss, abs=1e-12)
    ours.backward()
    # S_θ(y_w,i) is the sum of its tokens, so every chosen token's gradient equals dL/dS_θ(y_w,i)
    for i, toks in enumerate(CHOSEN_TOKENS):
        assert trl_token_grad[i, : len(toks)].tolist() == pytest.approx(
            [batch["policy_chosen_logps"].grad[i].item()] * len(toks), abs=1e-12)
    mean = build("rpo", beta=BETA, eta=ETA, sft_norm="mean")(rpo_batch()).losses.mean().item()
    assert abs(mean - trl_loss) == pytest.approx(ETA / 12, abs=1e-12)  # align's mean form is not TRL's


# --- GRPO KL: kl_estimator k3 (β·k3) vs k3_is (β·ρ·k3, TRL's use_bias_correction_kl=True) ---

LOGPS = [[-1.0, -2.0], [-0.5, -1.5]]
REF = [[-1.5, -2.0], [-1.0, -1.0]]  # d = log π_ref − log π_θ = [[−0.5, 0], [−0.5, 0.5]]
OLD = [[-1.2, -2.0], [-0.5, -1.2]]  # log ρ = log π_θ − log π_old = [[0.2, 0], [0, −0.3]]
KL_BETA = 0.1
E = math.exp
K3 = [[E(-0.5) - 0.5, 0.0], [E(-0.5) - 0.5, E(0.5) - 1.5]]  # e^d − d − 1 = [[0.1065307, 0], [0.1065307, 0.1487213]]
RHO = [[E(0.2), 1.0], [1.0, E(-0.3)]]


def kl_only_loss(estimator, old):
    """The loss with zero advantages (the policy term and its gradient vanish): β·Σ KL term / 4 tokens (bnpo)."""
    logps = torch.tensor(LOGPS, dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(logps, torch.zeros(2, dtype=F64), torch.ones(2, 2, dtype=torch.bool),
                                old_logps=None if old is None else torch.tensor(old, dtype=F64),
                                ref_logps=torch.tensor(REF, dtype=F64), beta=KL_BETA, loss_type="bnpo",
                                kl_estimator=estimator)
    loss.backward()
    return loss.item(), logps.grad.tolist(), metrics["kl"].item()


def flat(x):
    return [v for row in x for v in row]


def test_grpo_kl_off_policy_hand_values():
    k3, k3_grad, k3_metric = kl_only_loss("k3", OLD)
    assert k3 == pytest.approx(KL_BETA * sum(flat(K3)) / 4, abs=1e-12)  # 0.1·0.3617826/4 = 0.0090446
    assert k3_metric == pytest.approx(sum(flat(K3)) / 4, abs=1e-12)
    # d(β·k3)/d log π_θ = β·(1 − π_ref/π_θ) = β·(1 − e^d), /4 tokens
    d = [[-0.5, 0.0], [-0.5, 0.5]]
    assert flat(k3_grad) == pytest.approx([KL_BETA * (1 - E(x)) / 4 for x in flat(d)], abs=1e-12)

    k3_is, k3_is_grad, k3_is_metric = kl_only_loss("k3_is", OLD)
    weighted = [r * k for r, k in zip(flat(RHO), flat(K3))]  # e^0.2·0.1065307, 0, 0.1065307, e^−0.3·0.1487213
    assert k3_is == pytest.approx(KL_BETA * sum(weighted) / 4, abs=1e-12)  # 0.0097120
    assert k3_is_metric == pytest.approx(sum(weighted) / 4, abs=1e-12)
    # d(β·ρ·k3)/d log π_θ = β·ρ·(k3 + 1 − e^d) = β·ρ·(log π_θ − log π_ref) = β·ρ·(−d), /4 tokens
    assert flat(k3_is_grad) == pytest.approx([KL_BETA * r * -x / 4 for r, x in zip(flat(RHO), flat(d))], abs=1e-12)
    assert k3_is - k3 == pytest.approx(0.1 * ((E(0.2) - 1) * K3[0][0] + (E(-0.3) - 1) * K3[1][1]) / 4, abs=1e-12)


def test_grpo_kl_on_policy_same_loss_different_gradient():
    """ρ = 1 (old log-probs = the policy's, detached): equal losses; the gradients still differ wherever
    π_θ ≠ π_ref, as TRL's own help for use_bias_correction_kl says ("including on-policy")."""
    k3, k3_grad, _ = kl_only_loss("k3", None)
    k3_is, k3_is_grad, _ = kl_only_loss("k3_is", None)
    assert k3_is == pytest.approx(k3, abs=1e-15)
    assert k3 == pytest.approx(KL_BETA * sum(flat(K3)) / 4, abs=1e-12)
    # k3: β·(1 − e^d)/4; k3_is: β·(−d)/4
    assert flat(k3_grad) == pytest.approx([0.025 * (1 - E(-0.5)), 0.0, 0.025 * (1 - E(-0.5)), 0.025 * (1 - E(0.5))],
                                          abs=1e-12)
    assert flat(k3_is_grad) == pytest.approx([0.0125, 0.0, 0.0125, -0.0125], abs=1e-12)
    # they agree only at the token where π_θ = π_ref (both 0); elsewhere by β·k3/4 (≈ 0.00266, 0.00372)
    gap = [a - b for a, b in zip(flat(k3_is_grad), flat(k3_grad))]
    assert gap == pytest.approx([KL_BETA * k / 4 for k in flat(K3)], abs=1e-12)
    assert gap[1] == 0.0 and min(abs(gap[0]), abs(gap[2]), abs(gap[3])) > 2e-3


def trl_grpo_formula(use_bias_correction_kl, logps, advantages, mask, old, ref, loss_type, eps=(0.2, 0.28)):
    """grpo_trainer.py lines 3066-3160 for importance_sampling_level="token", delta=None, no vLLM, one process and
    no gradient accumulation, transcribed."""
    old = logps.detach() if old is None else old  # 3066-3067
    coef_1 = torch.exp(logps - old)  # 3083, 3085, 3095
    per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1  # 3100-3102
    if use_bias_correction_kl:  # 3104-3105
        per_token_kl = per_token_kl * coef_1
    adv = advantages.unsqueeze(1)
    coef_2 = torch.clamp(coef_1, 1 - eps[0], 1 + eps[1])  # 3113
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # 3118-3120
    per_token_loss = per_token_loss + KL_BETA * per_token_kl  # 3150
    mask = mask.to(logps.dtype)
    if loss_type == "grpo":  # 3153-3154
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo, 3158-3159


def trl_grpo_loss(use_bias_correction_kl, logps, advantages, mask, old, ref, loss_type):
    """TRL's own GRPOTrainer._compute_loss on the same per-token log-probs (the log-prob function stubbed out)."""
    from trl import GRPOTrainer  # imports vLLM: only in the slow test

    b, t = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(b, t, dtype=F64), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=KL_BETA,
        args=SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=None), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x))
    inputs = {"prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "ref_per_token_logps": ref}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return GRPOTrainer._compute_loss(stub, None, inputs)


# A whole GRPO batch: advantages of both signs, ρ = e^0.3 (Â > 0) and e^−0.3 (Â < 0) outside [0.8, 1.28], so the
# surrogate clips one token each side off-policy, and a padded token.
GRPO_LOGPS = [[-1.0, -2.0, -0.7], [-0.5, -1.5, 0.0]]
GRPO_OLD = [[-1.2, -2.0, -1.0], [-0.5, -1.2, 0.0]]
GRPO_REF = [[-1.5, -2.0, -1.0], [-1.0, -1.0, 0.0]]
GRPO_ADV = [0.8, -1.1]
GRPO_MASK = [[1, 1, 1], [1, 1, 0]]
GRID = [(loss_type, estimator, on_policy) for loss_type in ("grpo", "bnpo") for estimator in ("k3", "k3_is")
        for on_policy in (False, True)]


def grpo_case(fn, on_policy, *args):
    """[loss, *d loss / d logps flattened] of ``fn(*args[:1], logps, adv, mask, old, ref, *args[1:])``."""
    lp = torch.tensor(GRPO_LOGPS, dtype=F64, requires_grad=True)
    old = None if on_policy else torch.tensor(GRPO_OLD, dtype=F64)
    loss = fn(*args[:1], lp, torch.tensor(GRPO_ADV, dtype=F64), torch.tensor(GRPO_MASK, dtype=torch.bool), old,
              torch.tensor(GRPO_REF, dtype=F64), *args[1:])
    loss.backward()
    return [loss.item(), *flat(lp.grad.tolist())]


def align_grpo(estimator, lp, adv, mask, old, ref, loss_type):
    loss, _ = policy_loss(lp, adv, mask, old_logps=old, ref_logps=ref, beta=KL_BETA, epsilon=0.2, epsilon_high=0.28,
                          loss_type=loss_type, kl_estimator=estimator)
    return loss


@pytest.mark.parametrize("loss_type, estimator, on_policy", GRID)
def test_grpo_kl_matches_trl(loss_type, estimator, on_policy):
    """align's ``k3`` is TRL with ``use_bias_correction_kl=False``, ``k3_is`` is TRL's default: same loss and
    gradient to 1e-12; against TRL's other setting, the loss differs off-policy only, the gradient always."""
    ours = grpo_case(align_grpo, on_policy, estimator, loss_type)
    correction = estimator == "k3_is"
    assert ours == pytest.approx(grpo_case(trl_grpo_formula, on_policy, correction, loss_type), abs=1e-12)
    other = grpo_case(trl_grpo_formula, on_policy, not correction, loss_type)
    assert (abs(ours[0] - other[0]) < 1e-15) == on_policy
    assert max(abs(a - b) for a, b in zip(ours[1:], other[1:])) > 1e-3


@pytest.mark.slow
def test_trl_grpo_formula_is_trls_code():
    """The transcription above against GRPOTrainer._compute_loss itself, on every case of the grid."""
    for loss_type, estimator, on_policy in GRID:
        correction = estimator == "k3_is"
        assert grpo_case(trl_grpo_formula, on_policy, correction, loss_type) == pytest.approx(
            grpo_case(trl_grpo_loss, on_policy, correction, loss_type), abs=1e-12)


# --- config ---


def test_unknown_kl_estimator_is_one_line_before_the_model(repo, tmp_path, capsys, no_model_loads):
    code = main(get_recipe("grpo"), ["--config", str(repo / "configs/grpo/testbed.yaml"),
                                     f"output_dir={tmp_path}/out", "beta=0.04", "kl_estimator=k4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: kl_estimator: must be one of ('k3', 'k3_is'), got 'k4'\n"


def test_sft_norm_token_is_a_config_value_and_a_typo_is_one_line(repo, tmp_path, capsys, no_model_loads):
    argv = ["--config", str(repo / "configs/dpo/testbed.yaml"), f"output_dir={tmp_path}/out", "objective=rpo",
            "eta=0.1"]
    config = load_config(get_recipe("dpo").config_class, repo / "configs/dpo/testbed.yaml", argv[2:] + [
        "sft_norm=token"])
    assert config.objective_params()["sft_norm"] == "token"
    assert main(get_recipe("dpo"), [*argv, "sft_norm=tokens"]) == 2
    assert capsys.readouterr().err == "error: sft_norm: must be one of ('sum', 'mean', 'token'), got 'tokens'\n"
    with pytest.raises(ConfigError) as err:
        build("rpo", sft_norm="tokens")(rpo_batch())
    assert str(err.value) == "sft_norm: must be one of ('sum', 'mean', 'token'), got 'tokens'"
