"""Advantages over ragged groups and the RL policy losses, on hand-checked numbers."""

import math

import pytest
import torch

from align.objectives import aggregate, group_advantages, k3_kl, policy_loss, raft_advantages


def test_group_advantages_ragged_hand_values():
    # group 0 = {1, 0}: mean 0.5, unbiased std 0.70711; group 1 = {1, 0.5}: mean 0.75, std 0.35355;
    # group 7 has one sample: no baseline, advantage = raw reward.
    adv = group_advantages([1.0, 0.0, 1.0, 0.5, 2.0], [0, 0, 1, 1, 7])
    s0, s1 = math.sqrt(0.5), math.sqrt(0.125)
    expected = [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.25 / (s1 + 1e-4), -0.25 / (s1 + 1e-4), 2.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_advantages_noncontiguous_and_sizes():
    # groups need not be contiguous; sizes 3 and 1 and 2 side by side
    adv = group_advantages([3.0, 10.0, 0.0, 4.0, 5.0, 7.0], [5, 9, 5, 2, 5, 2], scale="none")
    # group 5 = {3, 0, 5}: mean 8/3; group 2 = {4, 7}: mean 5.5; group 9 alone keeps its raw reward
    assert adv.tolist() == pytest.approx([1 / 3, 10.0, -8 / 3, -1.5, 7 / 3, 1.5], abs=1e-6)


def test_group_advantages_batch_scale():
    # centred by group mean: [.5, -.5, 0, 0]; batch std of [1, 0, 1, 1] (unbiased) = 0.5
    adv = group_advantages([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], scale="batch")
    assert adv.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0], abs=1e-6)


def test_group_advantages_zero_variance_and_errors():
    assert group_advantages([1.0, 1.0, 1.0], [0, 0, 0]).tolist() == [0.0, 0.0, 0.0]
    assert group_advantages([], []).numel() == 0
    with pytest.raises(ValueError, match="scale"):
        group_advantages([1.0], [0], scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages([1.0, 2.0], [0])


def test_raft_advantages_threshold():
    assert raft_advantages([1.0, 0.0, 0.6, 0.5, 1.1]).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert raft_advantages([1.0, 0.2], threshold=0.1).tolist() == [1.0, 1.0]


TOKENS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("loss_type,kwargs,expected", [
    ("grpo", {}, (6 / 3 + 4 / 1) / 2),  # mean over sequences of the per-sequence token mean
    ("grpo", {"num_sequences": 4}, (6 / 3 + 4 / 1) / 4),  # B of the whole mini-batch
    ("bnpo", {}, 10 / 4),  # tokens of this batch
    ("dapo", {}, 10 / 4),
    ("dapo", {"num_tokens": 8}, 10 / 8),  # tokens of the whole accumulated batch
    ("dr_grpo", {"max_completion_length": 4}, 10 / (2 * 4)),
    ("dr_grpo", {"max_completion_length": 4, "num_sequences": 5}, 10 / (5 * 4)),
])
def test_aggregations(loss_type, kwargs, expected):
    assert aggregate(TOKENS, MASK, loss_type, **kwargs).item() == pytest.approx(expected)


def test_aggregate_split_invariance():
    # with the global normalisers, the two halves of a batch sum to the whole batch's loss
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        whole = aggregate(TOKENS, MASK, loss_type, max_completion_length=3)
        parts = sum(aggregate(TOKENS[i : i + 1], MASK[i : i + 1], loss_type, num_sequences=2, num_tokens=4,
                              max_completion_length=3) for i in range(2))
        assert parts.item() == pytest.approx(whole.item())


def test_k3_kl_hand_value():
    d = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert d.tolist() == pytest.approx([math.exp(-1) + 1 - 1, 0.0])


def test_clipped_surrogate_values_gradients_and_clip_metrics():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    logps = (old + ratios.log()).requires_grad_(True)
    # one advantage per sequence, so use three sequences of one token each
    logps3 = logps.reshape(3, 1)
    adv = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.ones(3, 1, dtype=torch.bool)
    loss, m = policy_loss(logps3, adv, mask, old_logps=old.reshape(3, 1), epsilon=0.2, epsilon_high=0.28,
                          loss_type="dapo")
    # token losses: -min(1.5, 1.28) = -1.28; -min(-0.5, -0.8) = 0.8; -min(2.2, 2.2) = -2.2
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 2.2) / 3, abs=1e-6)
    loss.backward()
    # clipped tokens carry no gradient; the free one has d/dlogp = -ρ·A / 3
    assert logps.grad.tolist()[0] == pytest.approx([0.0, 0.0, -1.1 * 2.0 / 3], abs=1e-6)
    assert m["clip_ratio/high"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/low"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/region"].item() == pytest.approx(2 / 3)


def test_ratio_one_gives_policy_gradient_and_kl_term():
    logps = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, m = policy_loss(logps, torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool), ref_logps=ref, beta=0.1,
                          loss_type="grpo")
    kl0 = math.exp(-1.0) + 1.0 - 1.0  # d = ref - logp = -1
    assert loss.item() == pytest.approx((-2.0 - 2.0 + 0.1 * kl0) / 2, abs=1e-6)
    assert m["kl"].item() == pytest.approx(kl0 / 2)
    loss.backward()
    # d/dlogp of -A·ρ at ρ=1 is -A; of β·k3 is β·(1 - exp(d))
    assert logps.grad.tolist()[0] == pytest.approx([(-2.0 + 0.1 * (1 - math.exp(-1.0))) / 2, -1.0], abs=1e-6)


def test_nll_policy_is_sft_on_accepted():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    loss, metrics = policy_loss(logps, torch.tensor([1.0, 0.0]), torch.ones(2, 2, dtype=torch.bool), policy="nll",
                                loss_type="dapo")
    assert loss.item() == pytest.approx(3.0 / 4)  # accepted sequence's NLL over all 4 tokens
    assert "clip_ratio/low" not in metrics
    with pytest.raises(ValueError, match="policy"):
        policy_loss(logps, torch.ones(2), torch.ones(2, 2), policy="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, torch.ones(2), torch.ones(2, 2), beta=0.1)


def test_truncated_importance_weights_hand_values():
    from align.objectives.policy import truncated_is_weights

    old = torch.tensor([[0.0, -1.0, -0.5]])
    sampler = torch.tensor([[-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    w, m = truncated_is_weights(old, sampler, mask, cap=2.0)
    # ratios e^1 = 2.718 (capped at 2) and e^-1 = 0.368 on the two real tokens
    assert w[0, :2].tolist() == pytest.approx([2.0, math.exp(-1)])
    assert m["rollout/logp_gap"].item() == pytest.approx(1.0)
    assert m["rollout/is_weight"].item() == pytest.approx((2.0 + math.exp(-1)) / 2)
    assert m["rollout/is_clipped"].item() == pytest.approx(0.5)
    none, m_off = truncated_is_weights(old, sampler, mask, cap=None)
    assert none is None and m_off["rollout/is_clipped"].item() == 0.0
    # the weights multiply the token loss: nll with advantage 1 is -(2·lp_0 + 0.368·lp_1) / 2 tokens (dapo)
    logps = torch.tensor([[-0.2, -0.4, -9.0]], requires_grad=True)
    loss, _ = policy_loss(logps, torch.tensor([1.0]), mask, policy="nll", loss_type="dapo", is_weights=w)
    assert loss.item() == pytest.approx((2.0 * 0.2 + math.exp(-1) * 0.4) / 2)
    loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([-1.0, -math.exp(-1) / 2, 0.0])


# ---------------------------------------------------------------- the registries chosen by config names


def test_advantage_estimators_by_name_hand_values():
    from align.errors import ConfigError
    from align.objectives import ESTIMATORS

    assert ESTIMATORS.names() == ("grpo", "raft")
    # The config offers every setting; each estimator takes only its own.
    settings = {"scale_rewards": "none", "accept_threshold": 0.9}
    # grpo, scale none (Dr.GRPO): group {1, 0} centred by 0.5; the one-sample group keeps its raw reward.
    assert ESTIMATORS.bind("grpo", **settings)([1.0, 0.0, 3.0], [0, 0, 1]).tolist() == [0.5, -0.5, 3.0]
    # raft: accepted above 0.9.
    assert ESTIMATORS.bind("raft", **settings)([1.0, 0.5, 0.95], [0, 0, 1]).tolist() == [1.0, 0.0, 1.0]
    # defaults: grpo scales by the group std + 1e-4 (std of {1, 0} = 0.70711); raft's threshold is 0.5.
    s = math.sqrt(0.5)
    assert ESTIMATORS.bind("grpo")([1.0, 0.0], [3, 3]).tolist() == pytest.approx([0.5 / (s + 1e-4),
                                                                                   -0.5 / (s + 1e-4)])
    assert ESTIMATORS.bind("raft")([0.6, 0.4], [0, 0]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"^advantage: unknown advantage 'ppo' \(known: grpo, raft\)"):
        ESTIMATORS.bind("ppo")


def test_aggregations_and_token_losses_by_name():
    from align.objectives import AGGREGATIONS, TOKEN_LOSSES

    assert AGGREGATIONS.names() == ("grpo", "bnpo", "dapo", "dr_grpo")
    assert [n for n in AGGREGATIONS.names() if AGGREGATIONS.get(n).info.get("per_micro_batch")] == ["bnpo"]
    assert TOKEN_LOSSES.names() == ("clip", "nll")
    assert TOKEN_LOSSES.get("clip").info["metrics"] == ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region")
    assert TOKEN_LOSSES.get("clip").params == {"epsilon": 0.2, "epsilon_high": None}
    # nll: -Â·log π per token, no metrics.
    loss, metrics = TOKEN_LOSSES.get("nll").fn(torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0]]), None, None)
    assert loss.tolist() == [[2.0, 4.0]] and metrics == {}
    # clip with ρ = e^0.5 = 1.6487 > 1 + 0.2 and Â = 1 > 0: clipped at 1.2, counted as high.
    logps, old = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]])
    loss, metrics = TOKEN_LOSSES.bind("clip", epsilon=0.2)(logps, torch.tensor([[1.0]]), old, torch.ones(1, 2))
    assert loss[0].tolist() == pytest.approx([-1.2, -1.0])
    assert metrics["clip_ratio/high"].item() == 0.5 and metrics["clip_ratio/low"].item() == 0.0


def test_a_registered_aggregation_is_used_by_policy_loss(monkeypatch):
    from align.objectives import AGGREGATIONS

    monkeypatch.setattr(AGGREGATIONS, "entries", dict(AGGREGATIONS.entries))

    @AGGREGATIONS.register("seq_sum", "token sum per sequence, averaged over sequences")
    def seq_sum(total, mask, b, num_tokens, max_completion_length):
        return total.sum() / b

    assert aggregate(TOKENS, MASK, "seq_sum").item() == pytest.approx(10 / 2)
    # nll with Â = 1 and log π = -TOKENS: the token losses are TOKENS themselves.
    loss, _ = policy_loss(-TOKENS, torch.ones(2), MASK, policy="nll", loss_type="seq_sum")
    assert loss.item() == pytest.approx(10 / 2)
    with pytest.raises(ValueError, match="loss_type: must be one of"):
        aggregate(TOKENS, MASK, "token_mean")
