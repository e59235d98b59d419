"""Preference oracles (rewards/preference.py): hand-checked probabilities, position-bias removal, validation."""

import math

import pytest
import torch

from align.errors import ConfigError, DataError, TrainingError
from align.rewards.preference import (
    CyclicOracle,
    FunctionOracle,
    PairwiseModelOracle,
    RewardOracle,
    VerifierOracle,
    build_oracle,
    check_columns,
)

A = {"answer": [3, 3, 3]}


def test_verifier_oracle_correct_beats_incorrect_ties_half():
    o = build_oracle("verifier:accuracy")
    p = o(["q"] * 3, ["Answer: 3", "Answer: 4", "no answer"], ["Answer: 4", "Answer: 5", "Answer: 3"], A)
    assert p.tolist() == [1.0, 0.5, 0.0]
    assert o.calls == 3
    check_columns(o, ["prompt", "answer"])
    with pytest.raises(DataError, match="train dataset: column 'answer' needed by oracle 'verifier:accuracy'"):
        check_columns(o, ["prompt"])


def test_reward_oracle_is_bradley_terry():
    o = RewardOracle("accuracy", scale=0.5)
    p = o(["q"] * 3, ["Answer: 3", "Answer: 4", "Answer: 4"], ["Answer: 4", "Answer: 3", "Answer: 5"], A)
    s = 1 / (1 + math.exp(-2.0))  # σ((1 − 0) / 0.5)
    assert p.tolist() == pytest.approx([s, 1 - s, 0.5], abs=1e-6)


def test_cyclic_oracle_is_rock_paper_scissors():
    o = CyclicOracle()
    p = o(["q"] * 5, ["Answer: 1", "Answer: 2", "Answer: 3", "none", "Answer: 4"],
          ["Answer: 0", "Answer: 1", "Answer: 2", "Answer: 5", "Answer: 7"])
    assert p.tolist() == [1.0, 1.0, 1.0, 0.0, 0.5]  # 1≻0, 2≻1, 0≻2, no answer loses, 4≡7 tie


def test_best_worst_ranks_by_mean_win_probability():
    o = VerifierOracle()
    best, worst, scores = o.best_worst("q", ["Answer: 4", "Answer: 3", "nothing"], {"answer": 3})
    assert (best, worst) == (1, 0)  # ties (both wrong) go to the earlier candidate
    assert scores == [0.25, 1.0, 0.25]
    assert o.calls == 3  # one call per unordered pair


def test_pairwise_model_oracle_averages_both_orders(tmp_path, testbed):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(testbed.policy)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "pm")
    tok.save_pretrained(tmp_path / "pm")
    o = build_oracle(f"pairwise:{tmp_path / 'pm'}")
    assert isinstance(o, PairwiseModelOracle)
    a, b = ["Answer: 3", "Answer: 12"], ["Answer: 4", "Answer: 1"]
    p_ab, p_ba = o(["q", "r"], a, b), o(["q", "r"], b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-6)  # no position bias left
    f_ab, f_ba = o.first_preferred(["q", "r"], a, b), o.first_preferred(["q", "r"], b, a)
    assert torch.allclose(p_ab, 0.5 * (f_ab + 1 - f_ba), atol=1e-6)
    assert not torch.allclose(f_ab + f_ba, torch.ones(2), atol=1e-4)  # the raw model does have a position bias
    assert o.calls == 4


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1])
def test_bad_probabilities_stop_naming_the_oracle(value):
    o = FunctionOracle(lambda prompts, a, b: [0.5, value], "mymod:judge")
    with pytest.raises(TrainingError, match=r"oracle 'mymod:judge' returned .* for pair 1"):
        o(["q", "q"], ["x", "y"], ["y", "x"])


@pytest.mark.parametrize("spec, match", [
    ("", "oracle: must be one of"),
    ("nonsense", "oracle: unknown oracle 'nonsense'"),
    ("reward:", "names no reward function"),
    ("pairwise:", "names no model path"),
    ("pairwise:/no/such/model", "cannot load pairwise preference model"),
    ("no_such_module_xyz:fn", "oracle: cannot load 'no_such_module_xyz:fn'"),
])
def test_bad_oracle_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_oracle(spec)


def test_function_oracle_from_module_spec():
    o = build_oracle(f"{__name__}:_half")
    assert o(["q"], ["a"], ["b"]).tolist() == [0.5]


def _half(prompts, a, b):
    return [0.5] * len(a)
