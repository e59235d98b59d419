"""Allocators chosen by name: the registry, each allocator on a fake round (hand-checked counts and generation
calls), and a toy allocator registered here being the one the round builder uses."""

from types import SimpleNamespace

import pytest
import torch

from align.errors import ConfigError
from align.rollout.base import Rollouts
from align.sampling import PromptStats
from align.sampling.allocators import ALLOCATORS, Allocation, RoundContext
from align.trainers.rounds import RoundBuilder


def args(**kw):
    base = dict(num_generations=2, seed=0, gvm_samples=8, gvm_interval=1, gvm_alpha=1e-3, gvm_beta=2.0,
                gvm_filter_threshold=1.0, gvm_filter_insufficient=0.0, gvm_min_n=0, gvm_max_n=None,
                gvm_reuse_samples=False, dynamic_max_rounds=3)
    return SimpleNamespace(**{**base, **kw})


def context(reward, dataset=(), **kw):
    """A RoundContext whose ``generate`` records (tag, counts, k_offset) and gives sample k of row g the reward
    ``reward(row, k)``; ``estimate`` stores p_i = share of rewards > 0.5 and G_i = 1 (G_i = 0 when p_i = 0)."""
    calls = []
    stats = PromptStats()

    def generate(rows, counts, tag, k_offset=0):
        calls.append((tag, list(counts), k_offset))
        return [SimpleNamespace(g=g, k=k, reward=reward(rows[g], k))
                for g, n in enumerate(counts) for k in range(k_offset, k_offset + n)]

    def estimate(rows, samples, index, prefix):
        for g, row in enumerate(rows):
            group = [s.reward > 0.5 for s in samples if s.g == g]
            if group:
                p = sum(group) / len(group)
                stats.update(row["uid"], index, accept_rate=p, grad_norm=1.0 if p else 0.0)
        return {f"{prefix}/prompts_measured": float(len(rows))}

    return RoundContext(args(**kw), stats, list(dataset), generate, estimate), calls


def test_registry_names_and_unknown_name():
    assert {"uniform", "gvm", "dynamic"} <= set(ALLOCATORS.names())
    with pytest.raises(ConfigError, match=r"^allocator: unknown allocator 'fixed' \(known: .*uniform"):
        ALLOCATORS.get("fixed")


def test_uniform():
    ctx, calls = context(lambda row, k: float(k))
    rows = [{"uid": 0}, {"uid": 1}]
    out = ALLOCATORS.get("uniform").fn(rows, 5, ctx)
    assert out.counts == [2, 2] and calls == [("r5", [2, 2], 0)]
    assert [(s.g, s.k) for s in out.samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_gvm_estimates_then_spreads_the_budget():
    # p = [4/8, 1/8], G = 1: w = 1/sqrt(p + 1e-3/p) = [1.41140, 2.74204]; N = 2 x 4 = 8 -> 8·w/Σw = [2.72, 5.28]
    # -> [3, 5]. The round's own rollouts are numbered after the 8 estimation samples (k_offset).
    accepted = {0: 4, 1: 1}
    ctx, calls = context(lambda row, k: float(k < accepted[row["uid"]]), num_generations=4, gvm_interval=2)
    rows = [{"uid": 0}, {"uid": 1}]
    out = ALLOCATORS.get("gvm").fn(rows, 0, ctx)
    assert calls == [("e0", [8, 8], 0), ("r0", [3, 5], 8)]
    assert out.counts == [3, 5] and len(out.samples) == 8 and out.samples[0].k == 8
    assert out.metrics["gvm/estimated_prompts"] == 2.0 and out.metrics["allocation/fallback"] == 0.0
    assert out.metrics["gvm/p_mean"] == pytest.approx(5 / 16)
    calls.clear()
    ALLOCATORS.get("gvm").fn(rows, 1, ctx)  # estimates one round old, interval 2: not stale
    assert calls == [("r1", [3, 5], 8)]


def test_gvm_reuses_estimation_samples_and_falls_back_to_uniform():
    ctx, calls = context(lambda row, k: float(k < 4), num_generations=4, gvm_reuse_samples=True)
    out = ALLOCATORS.get("gvm").fn([{"uid": 0}, {"uid": 1}], 0, ctx)  # equal p: [4, 4], all 4 taken from the 8
    assert calls == [("e0", [8, 8], 0), ("r0", [0, 0], 8)] and out.counts == [4, 4]
    assert [(s.g, s.k) for s in out.samples] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    ctx, calls = context(lambda row, k: 0.0, num_generations=4)  # nothing solved: every weight 0
    out = ALLOCATORS.get("gvm").fn([{"uid": 0}, {"uid": 1}], 0, ctx)
    assert out.counts == [4, 4] and out.metrics["allocation/fallback"] == 1.0 and calls[-1] == ("r0", [4, 4], 8)


def test_dynamic_replaces_zero_variance_groups():
    # Row uid 1 always scores 1 (no variance); every dataset row varies: one extra round replaces it.
    dataset = [{"uid": 10 + i} for i in range(5)]
    ctx, calls = context(lambda row, k: 1.0 if row["uid"] == 1 else float(k), dataset=dataset)
    out = ALLOCATORS.get("dynamic").fn([{"uid": 0}, {"uid": 1}, {"uid": 2}], 3, ctx)
    assert calls == [("r3", [2, 2, 2], 0), ("r3x1", [0, 0, 0, 2], 0)]
    assert out.counts == [2, 0, 2, 2] and out.rows[3] in dataset
    assert sorted({s.g for s in out.samples}) == [0, 2, 3]
    assert out.metrics == {"dynamic/extra_rounds": 1.0, "dynamic/all_zero_variance": 0.0}


def test_dynamic_gives_up_after_max_rounds():
    ctx, calls = context(lambda row, k: 1.0, dataset=[{"uid": 9}], dynamic_max_rounds=2)
    out = ALLOCATORS.get("dynamic").fn([{"uid": 0}, {"uid": 1}], 0, ctx)
    assert [c[0] for c in calls] == ["r0", "r0x1", "r0x2"]
    assert out.counts == [2, 2, 0, 0, 0, 0] and out.metrics["dynamic/all_zero_variance"] == 1.0


class Engine:
    """Completion k of a prompt is k + 1 copies of token 7."""

    def generate(self, prompts, n_per_prompt, sampling, keys=None):
        out = Rollouts()
        for i, n in enumerate(n_per_prompt):
            for k in range(n):
                out.prompt_index.append(i)
                out.sample_index.append(k)
                out.completion_ids.append([7] * (k + 1))
                out.finish_reason.append("stop")
                out.sampling_logps.append([0.0] * (k + 1))
        return out


def rewards(prompts, completions, uids, lengths, columns):
    return [float(n) for n in lengths], {"length": [float(n) for n in lengths]}, {}


def test_a_registered_toy_allocator_is_the_one_the_round_builder_uses(monkeypatch):
    monkeypatch.setattr(ALLOCATORS, "entries", dict(ALLOCATORS.entries))  # the toy is gone after this test

    @ALLOCATORS.register("every_other", "num_generations + 1 for even rows, none for odd rows")
    def every_other(rows, index, ctx):
        counts = [ctx.args.num_generations + 1 if i % 2 == 0 else 0 for i in range(len(rows))]
        return Allocation(rows, counts, ctx.generate(rows, counts, f"r{index}"), {"toy/round": float(index)})

    a = SimpleNamespace(allocator="every_other", advantage="grpo", scale_rewards="none", accept_threshold=0.5,
                        grad_norm_monitor_steps=None, num_generations=2, max_completion_length=4, temperature=1.0,
                        top_p=1.0, top_k=0, seed=0, num_minibatches=1, num_iterations=1, updates_per_round=1,
                        beta=0.0, micro_batch_size=4, max_tokens_per_micro_batch=16384, logits_block_size=512,
                        device="cpu")
    tok = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["x" * len(i) for i in ids])
    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=False)
    builder = RoundBuilder(a, acc, Engine(), lambda policy, step: 0.0,
                           rewards, tok, [], 0, policy=lambda: torch.nn.Linear(1, 1), reference=None, step=lambda: 0)
    rows = [{"uid": u, "prompt": "p", "prompt_ids": [1, 2]} for u in range(4)]
    rnd = builder.make(rows, 7)
    assert [(s.g, s.k) for s in rnd.samples] == [(g, k) for g in (0, 2) for k in range(3)]
    # Rewards are lengths 1, 2, 3 in each group: Dr.GRPO advantages r - 2.
    assert [s.advantage for s in rnd.samples] == [-1.0, 0.0, 1.0] * 2
    assert rnd.metrics["toy/round"] == 7.0 and rnd.metrics["allocation/prompts_dropped"] == 2.0
    assert rnd.metrics["rollouts/round"] == 6.0 and builder.rollouts_total == 6
