"""GVM allocation, sum-preserving rounding, DAPO group filters and the per-prompt statistics store."""

import json
import math
import random

import pytest

from align.sampling import (
    PromptStats,
    gvm_allocate,
    gvm_weights,
    nonzero_variance_groups,
    round_preserving_sum,
    select_groups,
    uniform_allocate,
)

# ---------------------------------------------------------------- round_preserving_sum


@pytest.mark.parametrize(
    "values,total,expected",
    [
        ([1.5, 1.5, 1.0], 4, [2, 1, 1]),  # rounds to [2,2,1]; the tie at -0.5: the higher index gives up its unit
        ([2.5, 2.5], 5, [3, 2]),
        ([4 / 3, 4 / 3, 4 / 3], 4, [2, 1, 1]),  # rounds to [1,1,1]; equal residuals: the lower index gets the unit
        ([0.4 * 5, 0.4 * 5, 0.2 * 5], 5, [2, 2, 1]),  # already integral
        ([0.6, 0.6, 0.6, 1.2], 3, [1, 1, 0, 1]),  # rounds to [1,1,1,1]; smallest residual -0.4, last of the tie
        ([3.7, 0.2, 0.1], 4, [4, 0, 0]),
        ([0.2, 0.3], 5, [2, 3]),  # total above the sum: units go round by residual
        ([0.0, 3.0], 1, [0, 1]),  # total below the sum: never below zero
        ([0.0, 0.0], 0, [0, 0]),
        ([], 0, []),
    ],
)
def test_round_preserving_sum_hand_cases(values, total, expected):
    assert round_preserving_sum(values, total) == expected


def test_round_preserving_sum_random_properties():
    rng = random.Random(0)
    for _ in range(300):
        m = rng.randint(1, 30)
        raw = [rng.random() for _ in range(m)]
        total = rng.randint(0, 200)
        s = sum(raw)
        values = [total * x / s for x in raw]
        out = round_preserving_sum(values, total)
        assert sum(out) == total
        assert all(k >= 0 for k in out)
        assert all(abs(k - v) < 1.0 for k, v in zip(out, values))  # largest remainder: floor or ceil


def test_round_preserving_sum_errors():
    with pytest.raises(ValueError, match="values"):
        round_preserving_sum([1.0, -0.5], 1)
    with pytest.raises(ValueError, match="values"):
        round_preserving_sum([math.nan], 1)
    with pytest.raises(ValueError, match="total"):
        round_preserving_sum([1.0], -1)
    with pytest.raises(ValueError, match="values"):
        round_preserving_sum([], 2)


def test_uniform_allocate():
    assert uniform_allocate(3, 8) == [8, 8, 8]
    assert uniform_allocate(0, 8) == []
    with pytest.raises(ValueError, match="n"):
        uniform_allocate(3, -1)


# ---------------------------------------------------------------- GVM weights and allocation


def test_weight_table_of_methods_13_2():
    """docs/methods.md §13.2: with G = 1 and p = k/8, the weight relative to p = 1 (α = 1e-3, β = 2)."""
    table = {1: 2.74, 2: 1.98, 3: 1.63, 4: 1.41, 5: 1.26, 6: 1.15, 7: 1.07, 8: 1.00}
    p = [k / 8 for k in table]
    w = gvm_weights(p, [1.0] * len(p))
    for (k, factor), wk in zip(table.items(), w):
        assert abs(wk / w[-1] - factor) <= 0.01, (k, wk / w[-1])
        assert abs(wk / w[-1] - 1 / math.sqrt(k / 8)) / (1 / math.sqrt(k / 8)) < 0.031  # ~3 % of 1/sqrt(p)


def test_weights_formula_and_zeros():
    w = gvm_weights([0.5, 0.0, 0.5, 0.25], [2.0, 1.0, 0.0, 1.0], alpha=0.01, beta=3.0)
    assert w[1] == 0.0 and w[2] == 0.0
    assert w[0] == pytest.approx(2.0 / math.sqrt(0.5 + 0.01 / 0.5**2))
    assert w[3] == pytest.approx(1.0 / math.sqrt(0.25 + 0.01 / 0.25**2))
    # The peak is at p* = sqrt(alpha) for beta = 2, and w -> 0 as p -> 0.
    ps = [0.01, 0.0316, 0.1]
    wp = gvm_weights(ps, [1.0] * 3, alpha=1e-3)
    assert wp[1] > wp[0] and wp[1] > wp[2]
    assert gvm_weights([1e-9], [1.0])[0] < 1e-2


def test_allocate_drops_p0_and_g0():
    assert gvm_allocate([0.5, 0.0, 0.5], [1.0, 1.0, 0.0], 4) == [4, 0, 0]


def test_allocate_ties_and_exact_rule():
    assert gvm_allocate([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], 4) == [2, 1, 1]
    # alpha = 0: w = G/sqrt(p) = [2, 1] -> ratios [2/3, 1/3] -> [4, 2] out of 6.
    assert gvm_allocate([0.25, 1.0], [1.0, 1.0], 6, alpha=0.0) == [4, 2]
    # w = [2, 1, 1] -> N*w~ = [3, 1.5, 1.5] -> rounded [3, 2, 2] (7) -> the later tied entry gives one back.
    assert gvm_allocate([0.25, 1.0, 1.0], [1.0] * 3, 6, alpha=0.0) == [3, 2, 1]
    # p = 1 prompts still get about G_i.
    assert gvm_allocate([1.0, 1.0], [3.0, 1.0], 8, alpha=0.0) == [6, 2]


def test_allocate_matches_reference_rule_randomly():
    rng = random.Random(1)
    for _ in range(200):
        m = rng.randint(1, 40)
        p = [rng.choice([0.0, 1.0, rng.randint(0, 8) / 8]) for _ in range(m)]
        g = [rng.choice([0.0, rng.uniform(0.1, 50.0)]) for _ in range(m)]
        n_total = 8 * m
        w = [0.0 if pi == 0 or gi == 0 else gi / math.sqrt(pi + 1e-3 / pi) for pi, gi in zip(p, g)]
        out = gvm_allocate(p, g, n_total)
        if sum(w) == 0:
            assert out == [0] * m
            continue
        ratio = [x / sum(w) for x in w]
        ratio = [r / sum(ratio) for r in ratio]
        assert out == round_preserving_sum([n_total * r for r in ratio], n_total)
        assert sum(out) == n_total
        assert all(k == 0 for k, x in zip(out, w) if x == 0)


def test_allocate_filter_threshold():
    # Without the filter: [3, 2, 1]; dropping the always-solved prompts leaves the whole budget to the first.
    assert gvm_allocate([0.25, 1.0, 1.0], [1.0] * 3, 6, alpha=0.0, filter_threshold=0.9) == [6, 0, 0]
    # The default 1.0 (p <= 1) and thresholds <= 0 are off, as in GVM's code.
    assert gvm_allocate([0.25, 1.0, 1.0], [1.0] * 3, 6, alpha=0.0, filter_threshold=1.0) == [3, 2, 1]
    assert gvm_allocate([0.25, 1.0, 1.0], [1.0] * 3, 6, alpha=0.0, filter_threshold=0.0) == [3, 2, 1]
    # Everything filtered: nothing to allocate (min_n each).
    assert gvm_allocate([1.0, 1.0], [1.0, 1.0], 4, filter_threshold=0.5) == [0, 0]


def test_allocate_filter_insufficient():
    # ratios [2/3, 1/3]; expected accepted p*w~*N = [0.25*4, 1*2] = [1, 2].
    assert gvm_allocate([0.25, 1.0], [1.0, 1.0], 6, alpha=0.0, filter_insufficient=1.5) == [0, 6]
    assert gvm_allocate([0.25, 1.0], [1.0, 1.0], 6, alpha=0.0, filter_insufficient=0.99) == [4, 2]
    assert gvm_allocate([0.25, 1.0], [1.0, 1.0], 6, alpha=0.0, filter_insufficient=2.5) == [0, 0]


def test_allocate_min_and_max():
    p, g = [0.25, 1.0, 1.0, 0.0], [1.0] * 4  # alpha = 0: ratios [0.5, 0.25, 0.25, 0]
    assert gvm_allocate(p, g, 12, alpha=0.0) == [6, 3, 3, 0]
    # min_n = 1: everyone (the p = 0 prompt too) gets 1, the other 8 go [4, 2, 2].
    assert gvm_allocate(p, g, 12, alpha=0.0, min_n=1) == [5, 3, 3, 1]
    # max_n = 4 (3 above min_n): shares [4, 2, 2] -> the first is capped at 3, the other 5 split [2.5, 2.5]
    # -> rounded [3, 3, 3] (9) -> the later tied entry gives one back -> [3, 3, 2] + 1.
    assert gvm_allocate(p, g, 12, alpha=0.0, min_n=1, max_n=4) == [4, 4, 3, 1]
    # Cascading caps: shares [6, 3, 1] with cap 4 -> [4, 4.5, 1.5] -> [4, 4, 2].
    assert gvm_allocate([1.0] * 3, [6.0, 3.0, 1.0], 10, alpha=0.0) == [6, 3, 1]
    assert gvm_allocate([1.0] * 3, [6.0, 3.0, 1.0], 10, alpha=0.0, max_n=4) == [4, 4, 2]
    # Unreachable budget: positive-weight prompts at max_n, the rest at min_n, the sum below N.
    assert gvm_allocate(p, g, 20, alpha=0.0, min_n=1, max_n=4) == [4, 4, 4, 1]
    # max_n == min_n: everyone gets exactly that.
    assert gvm_allocate(p, g, 8, alpha=0.0, min_n=2, max_n=2) == [2, 2, 2, 2]
    # All weights zero: min_n each, whatever the budget.
    assert gvm_allocate([0.0, 0.5], [1.0, 0.0], 10) == [0, 0]
    assert gvm_allocate([0.0, 0.5], [1.0, 0.0], 10, min_n=2) == [2, 2]
    assert gvm_allocate([], [], 0) == []


def test_allocate_bounds_random_properties():
    rng = random.Random(2)
    for _ in range(300):
        m = rng.randint(1, 30)
        p = [rng.randint(0, 8) / 8 for _ in range(m)]
        g = [rng.uniform(0.0, 10.0) for _ in range(m)]
        min_n = rng.randint(0, 3)
        max_n = rng.choice([None, min_n + rng.randint(0, 20)])
        budget = m * min_n + rng.randint(0, 16 * m)
        out = gvm_allocate(p, g, budget, min_n=min_n, max_n=max_n)
        positive = [pi > 0 and gi > 0 for pi, gi in zip(p, g)]
        assert all(k >= min_n for k in out)
        assert max_n is None or all(k <= max_n for k in out)
        assert all(k == min_n for k, pos in zip(out, positive) if not pos)
        if not any(positive):
            assert out == [min_n] * m
        elif max_n is None or sum(positive) * (max_n - min_n) >= budget - m * min_n:
            assert sum(out) == budget
        else:
            assert out == [max_n if pos else min_n for pos in positive]
            assert sum(out) < budget


def test_allocate_errors():
    with pytest.raises(ValueError, match="lengths differ"):
        gvm_allocate([0.5], [1.0, 1.0], 4)
    with pytest.raises(ValueError, match="accept_rates"):
        gvm_allocate([-0.1], [1.0], 4)
    with pytest.raises(ValueError, match="accept_rates"):
        gvm_allocate([1.5], [1.0], 4)
    with pytest.raises(ValueError, match="accept_rates"):
        gvm_allocate([math.nan], [1.0], 4)
    with pytest.raises(ValueError, match="grad_norms"):
        gvm_allocate([0.5], [-1.0], 4)
    with pytest.raises(ValueError, match="grad_norms"):
        gvm_allocate([0.5], [math.nan], 4)
    with pytest.raises(ValueError, match="budget"):
        gvm_allocate([0.5], [1.0], -1)
    with pytest.raises(ValueError, match="min_n"):
        gvm_allocate([0.5], [1.0], 4, min_n=-1)
    with pytest.raises(ValueError, match="max_n"):
        gvm_allocate([0.5], [1.0], 4, min_n=3, max_n=2)
    with pytest.raises(ValueError, match=r"budget N=5 is smaller than min_n\*prompts=6"):
        gvm_allocate([0.5, 0.5, 0.5], [1.0] * 3, 5, min_n=2)
    with pytest.raises(ValueError, match="alpha"):
        gvm_allocate([0.5], [1.0], 4, alpha=-1e-3)
    with pytest.raises(ValueError, match="alpha"):
        gvm_weights([0.5], [1.0], alpha=-1.0)


# ---------------------------------------------------------------- DAPO dynamic sampling


def test_nonzero_variance_groups():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5]
    ids = [0, 0, 1, 1, 2, 2, 3]  # mixed, all correct, all wrong, size 1
    assert nonzero_variance_groups(rewards, ids) == [0]
    # Non-contiguous groups, reported in order of first appearance.
    assert nonzero_variance_groups([1.0, 0.0, 0.0, 1.0, 1.0], [5, 3, 5, 3, 9]) == [5, 3]
    # Equality within 1e-12.
    assert nonzero_variance_groups([1.0, 1.0 + 1e-13], [0, 0]) == []
    assert nonzero_variance_groups([1.0, 1.0 + 1e-9], [0, 0]) == [0]
    assert nonzero_variance_groups([], []) == []
    with pytest.raises(ValueError, match="lengths differ"):
        nonzero_variance_groups([1.0], [0, 0])
    with pytest.raises(ValueError, match="rewards"):
        nonzero_variance_groups([math.nan, 1.0], [0, 0])


def test_select_groups():
    assert select_groups([5, 3, 7], 2) == [5, 3]
    assert select_groups([5, 3], 4) == [5, 3]
    assert select_groups([5, 3], 0) == []
    with pytest.raises(ValueError, match="target"):
        select_groups([1], -1)


# ---------------------------------------------------------------- PromptStats


def test_prompt_stats_update_get_and_staleness():
    stats = PromptStats()
    assert stats.get(1) is None and stats.is_stale(1, step=0, interval=5)
    stats.update(1, 3, accept_rate=0.5)
    stats.update(1, 3, grad_norm=2.0)  # same step: merged
    assert stats.get(1) == {"step": 3, "accept_rate": 0.5, "grad_norm": 2.0}
    assert stats.is_stale(1, step=5, interval=2)  # 3 <= 5 - 2
    assert not stats.is_stale(1, step=5, interval=3)  # 3 > 5 - 3
    assert stats.is_stale(1, step=3, interval=0)
    stats.update(1, 7, accept_rate=0.75)  # new step: a new record
    assert stats.get(1) == {"step": 7, "accept_rate": 0.75}
    assert [r["step"] for r in stats.state_dict()["prompts"][0]["records"]] == [3, 7]
    got = stats.get(1)
    got["accept_rate"] = 0.0  # copies, not views
    assert stats.get(1)["accept_rate"] == 0.75
    with pytest.raises(ValueError, match="interval"):
        stats.is_stale(1, step=5, interval=-1)
    with pytest.raises(TypeError, match="uid"):
        stats.update(1.5, 0, accept_rate=0.1)
    with pytest.raises(TypeError, match="grad_norm"):
        stats.update(1, 0, grad_norm=[1.0])


def test_prompt_stats_history_bounded():
    stats = PromptStats()
    for step in range(25):
        stats.update("a", step, accept_rate=step / 25)
    hist = stats.state_dict()["prompts"][0]["records"]
    assert len(hist) == 20 and hist[0]["step"] == 5 and hist[-1]["step"] == 24


def test_prompt_stats_state_dict_round_trip():
    stats = PromptStats()
    stats.update(1, 0, accept_rate=0.5, grad_norm=3.0, n_samples=8)
    stats.update("1", 0, accept_rate=0.25)  # a str uid distinct from the int 1
    stats.update("q-7", 2, accept_rate=1.0)
    stats.update(1, 4, accept_rate=0.625)
    state = stats.state_dict()
    loaded = PromptStats()
    loaded.load_state_dict(json.loads(json.dumps(state)))  # JSON-serialisable, and back
    uids = [entry["uid"] for entry in loaded.state_dict()["prompts"]]
    assert uids == [1, "1", "q-7"]
    assert isinstance(uids[0], int)
    assert loaded.get(1) == {"step": 4, "accept_rate": 0.625}
    assert loaded.get("1") == {"step": 0, "accept_rate": 0.25}
    assert loaded.state_dict() == state
    fresh = PromptStats()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
