"""Gradient monitors: per-sequence gradients and the entanglement quantities equal autograd computed
directly; the predicted signs of Δlog π come true after one small SGD step; shared suffixes entangle."""

import pytest
import torch

from align.errors import ConfigError
from align.logps import pack, token_logps
from align.monitors.entanglement import CASES, case_of, entanglement, pair_stats, select_subset, summarize
from align.monitors.gradients import sequence_grads


@pytest.fixture(scope="module")
def policy(testbed):
    from align.modeling import load_model, load_tokenizer

    return load_model(str(testbed.policy)), load_tokenizer(str(testbed.policy))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def summed_logp(model, prompt, completion, pad_id):
    ids, attn, cmask, width = pack([prompt], [completion], pad_id)
    return (token_logps(model, ids, attn, width) * cmask).sum()


def direct_grad(model, params, prompt, completion, pad_id, partner=None):
    """∇ S_θ(completion) by a plain backward; with ``partner``, the sequence sits in a batch beside it (the
    padding the monitor's pair batch has, which moves float rounding by ~1e-4 over every parameter)."""
    model.zero_grad()
    if partner is None:
        summed_logp(model, prompt, completion, pad_id).backward()
    else:
        ids, attn, cmask, width = pack([prompt, prompt], [completion, partner], pad_id)
        (token_logps(model, ids, attn, width) * cmask).sum(-1)[0].backward()
    return torch.cat([p.grad.reshape(-1).double() for p in params])


@pytest.fixture(scope="module")
def pairs(policy):
    _, tok = policy
    prompt = encode(tok, "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    right, wrong = encode(tok, "3 + 4 = 7. Answer: 7"), encode(tok, "3 + 4 = 8. Answer: 8")
    other = encode(tok, "Answer: 7")
    return [(prompt, right, wrong), (prompt, other, wrong), (prompt, right, other),
            (encode(tok, "<|im_start|>user\nWhat is 9 - 5?<|im_end|>\n<|im_start|>assistant\n"),
             encode(tok, "9 - 5 = 4. Answer: 4"), encode(tok, "9 - 5 = 3. Answer: 3"))]


@pytest.mark.slow
@pytest.mark.parametrize("subset", ["lm_head", "all"])
def test_pair_quantities_equal_direct_autograd(policy, pairs, subset):
    """Pair by pair (the pair's two sequences in one batch, as a plain backward sees them) to 1e-5; the pairs
    batched together to 2e-3 (left padding to the longest prompt shifts RoPE positions: same maths, other
    float rounding, ~3e-4 on a norm over every parameter)."""
    model, tok = policy
    params = [p for _, p in select_subset(model, subset)]
    batched = entanglement(model, [p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs],
                           tok.pad_token_id, params)
    for (prompt, c, r), together in zip(pairs, batched, strict=True):
        (row,) = entanglement(model, [prompt], [c], [r], tok.pad_token_id, params)
        g_w = direct_grad(model, params, prompt, c, tok.pad_token_id, partner=r)
        g_l = direct_grad(model, params, prompt, r, tok.pad_token_id, partner=c)
        direct = {"dot": float(g_w @ g_l), "norm_chosen": float(g_w.norm()), "norm_rejected": float(g_l.norm()),
                  "cos": float(torch.nn.functional.cosine_similarity(g_w, g_l, dim=0)),
                  "ratio": float(g_w @ g_l) / min(float(g_w @ g_w), float(g_l @ g_l))}
        for key, value in direct.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            assert together[key] == pytest.approx(value, rel=2e-3, abs=1e-4), key
        with torch.no_grad():
            assert row["logp_chosen"] == pytest.approx(float(summed_logp(model, prompt, c, tok.pad_token_id)), abs=1e-4)
    model.zero_grad()


def test_pair_stats_cases_on_hand_made_gradients():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert pair_stats(e1, e2)["case"] == "ideal"  # orthogonal: ⟨g_w,g_l⟩ = 0 < both squared norms
    s = pair_stats(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))  # dot 2: > ‖g_w‖² = 1, < ‖g_l‖² = 4
    assert s["case"] == "both_down" and s["pred_chosen"] == -1 and s["pred_rejected"] == -1
    assert s["cos"] == pytest.approx(1.0) and s["ratio"] == pytest.approx(2.0)  # 2 / min(1, 4)
    assert pair_stats(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))["case"] == "both_up"  # dot 2 < 4, > 1
    # A slope ratio d_w/d_l = 3 (e.g. a shorter chosen under token averaging) lifts the chosen condition.
    assert pair_stats(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), slope_ratio=3.0)["case"] == "both_up"
    assert case_of(False, False) == "inverted"
    rows = [pair_stats(e1, e2) | {"logp_chosen": -1.0, "logp_rejected": -2.0},
            s | {"logp_chosen": -3.0, "logp_rejected": -4.0}]
    out = summarize(rows)
    assert [out[f"entanglement/{c}"] for c in CASES] == [0.5, 0.5, 0.0, 0.0]
    assert out["entanglement/logps_chosen"] == -2.0
    later = [r | {"logp_chosen": r["logp_chosen"] + 1, "logp_rejected": r["logp_rejected"] - 1} for r in rows]
    out = summarize(later, rows)  # both chosen up, both rejected down: 3 of the 4 predicted signs held
    assert out["entanglement/observed_chosen_up"] == 1.0 and out["entanglement/observed_rejected_down"] == 1.0
    assert out["entanglement/sign_agreement"] == 0.75


@pytest.mark.slow
def test_predicted_signs_match_one_small_sgd_step(policy, pairs):
    """First order: one SGD step of size η on a margin loss −m·(S_w − S_l) over the subset moves S_w by
    ηm(‖g_w‖² − ⟨g_w,g_l⟩) and S_l by ηm(⟨g_w,g_l⟩ − ‖g_l‖²) (DPO's m = βσ(−βΔ) only rescales η; m = 1
    here, as DPO's σ underflows on pairs the model separates by 100+ nats). η is set so the larger move
    is 0.002 nats; every move must land within 2e-4 nats (a tenth of it) of its prediction (second-order
    terms), and every move predicted beyond that must happen with the predicted sign."""
    import copy

    model, tok = policy
    pad = tok.pad_token_id
    checked = 0
    for subset in ("lm_head", "last_block", "all"):
        for prompt, c, r in pairs:
            m = copy.deepcopy(model)
            params = [p for _, p in select_subset(m, subset)]
            (row,) = entanglement(m, [prompt], [c], [r], pad, params)
            with torch.no_grad():
                s_w, s_l = float(summed_logp(m, prompt, c, pad)), float(summed_logp(m, prompt, r, pad))
            sq_w, sq_l, dot = row["norm_chosen"] ** 2, row["norm_rejected"] ** 2, row["dot"]
            lr = 0.002 / max(abs(sq_w - dot), abs(dot - sq_l))
            predicted = (lr * (sq_w - dot), lr * (dot - sq_l))
            for p in m.parameters():
                p.requires_grad_(any(p is q for q in params))
            loss = summed_logp(m, prompt, r, pad) - summed_logp(m, prompt, c, pad)
            loss.backward()
            torch.optim.SGD(params, lr=lr).step()
            with torch.no_grad():
                observed = (float(summed_logp(m, prompt, c, pad)) - s_w, float(summed_logp(m, prompt, r, pad)) - s_l)
            assert predicted[0] * row["pred_chosen"] > 0 and predicted[1] * row["pred_rejected"] > 0
            for pred, obs in zip(predicted, observed, strict=True):
                assert abs(obs - pred) < 2e-4, (subset, pred, obs)
                if abs(pred) > 2e-4:
                    assert obs * pred > 0, (subset, pred, obs)
                    checked += 1
    assert checked >= 16, checked  # of 24 moves (3 subsets x 4 pairs x chosen/rejected)


@pytest.mark.slow
def test_shared_suffixes_entangle(policy):
    """docs/methods.md §12.1: long shared suffixes drive cos(g_w, g_l) towards 1 and take pairs out of the ideal case
    (chosen up, rejected down) into a case where both move together; which one (both up, as Mistral on TL;DR,
    or both down, as Llama) depends on the model. 24 pairs (a + 1, a − 1, a × 2 for a = 1..8; rejected = the
    answer plus one), measured over every parameter on the testbed policy.

    The testbed's weights depend on the CPU that builds it (docs/testbed.md), so the figures do too; the test
    asserts the comparison, which holds on both machines measured. Intel (2026-11-24): single differing token cos
    median 0.58, ideal 23/24, both down 1/24; with 3 repeats of a shared suffix cos median 0.99, ideal 4/24, both
    up 13/24, both down 7/24. AMD EPYC, AVX2 (2026-12-01): short cos median 0.80, ideal 13/24, both down 6/24,
    both up 5/24; long cos median 0.99, ideal 2/24, both down 16/24, both up 6/24."""
    model, tok = policy
    params = [p for _, p in select_subset(model, "all")]
    stats = {}
    for name, repeats in (("short", 0), ("long", 3)):
        prompts, chosen, rejected = [], [], []
        for op, x, fn in (("+", 1, lambda a: a + 1), ("-", 1, lambda a: a - 1), ("*", 2, lambda a: a * 2)):
            for a in range(1, 9):
                b = fn(a)
                prompts.append(encode(tok, f"<|im_start|>user\nWhat is {a} {op} {x}?<|im_end|>\n"
                                           "<|im_start|>assistant\n"))
                tail = f". So {a} {op} {x} = {b}. Answer: {b}" * repeats
                chosen.append(encode(tok, f"{b}{tail}"))
                rejected.append(encode(tok, f"{b + 1}{tail}"))
        rows = entanglement(model, prompts, chosen, rejected, tok.pad_token_id, params)
        stats[name] = summarize(rows)
    long, short = stats["long"], stats["short"]
    together = {k: v["entanglement/both_up"] + v["entanglement/both_down"] for k, v in stats.items()}
    assert long["entanglement/cos_median"] > 0.95, stats
    assert long["entanglement/cos_median"] > short["entanglement/cos_median"] + 0.15, stats
    assert long["entanglement/ideal"] <= 0.25 and long["entanglement/ideal"] < short["entanglement/ideal"] - 0.3, stats
    assert together["long"] >= 0.75 and together["long"] > together["short"] + 0.3, stats
    # the check, "both down" above zero on long shared suffixes, and more often than without them
    assert long["entanglement/both_down"] >= 0.2 and long["entanglement/both_down"] > short["entanglement/both_down"], \
        stats


def test_sequence_grads_match_backward(policy, pairs):
    model, tok = policy
    params = [p for _, p in select_subset(model, "embeddings")]
    prompt, c, _ = pairs[0]
    ((g, s),) = list(sequence_grads(model, [prompt], [c], tok.pad_token_id, params))
    assert torch.allclose(g.double(), direct_grad(model, params, prompt, c, tok.pad_token_id), atol=1e-6)
    model.zero_grad()


@pytest.mark.parametrize("spec,match", [
    ("no_such_layer", "entanglement_params: .*matches no parameter"),
    ("lora", "entanglement_params: subset 'lora' matches no parameter"),
    ([], "entanglement_params: empty parameter subset"),
])
def test_bad_subset_is_one_line(policy, spec, match):
    with pytest.raises(ConfigError, match=match):
        select_subset(policy[0], spec)


def test_subsets(policy):
    model, _ = policy
    assert [n for n, _ in select_subset(model, "lm_head")] == ["lm_head.weight"]
    assert [n for n, _ in select_subset(model, "embeddings")] == ["model.embed_tokens.weight"]
    last = [n for n, _ in select_subset(model, "last_block")]
    assert last and all(n.startswith("model.layers.3.") for n in last)
    assert len(select_subset(model, "all")) == len(list(model.parameters()))


# --- the monitor and the feedback inside PreferenceTrainer ---------------------------------------------------


def dpo_cfg(repo, tmp_path, **kw):
    from align.config import load_config
    from align.recipes.dpo import DPORecipeConfig

    over = {"output_dir": str(tmp_path / "out"), "max_steps": 10, "logging_steps": 5, "disable_tqdm": True,
            "overwrite_output_dir": True, "max_eval_samples": 16, **kw}
    return load_config(DPORecipeConfig, repo / "configs/dpo/testbed.yaml", over)


@pytest.mark.slow
def test_monitor_logs_cases_writes_table_and_plot(repo, tmp_path, testbed):
    import json

    from align.recipes.dpo import build_trainer

    trainer = build_trainer(dpo_cfg(repo, tmp_path, entanglement_steps=5, entanglement_probe_size=16,
                                    entanglement_params=["lm_head", "last_block"]))
    trainer.train()
    out = tmp_path / "out"
    logs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    checked = [r for r in logs if "entanglement/ideal" in r]
    assert [r["step"] for r in checked] == [0, 5, 10]  # the baseline before the first step, its own record
    assert "entanglement/sign_agreement" not in checked[0] and "loss" not in checked[0]
    for r in checked:
        assert sum(r[f"entanglement/{c}"] for c in CASES) == pytest.approx(1.0)
    for r in checked[1:]:
        assert 0.0 <= r["entanglement/sign_agreement"] <= 1.0
    table = [json.loads(x) for x in open(out / "entanglement.jsonl")]
    assert [sum(t["step"] == s for t in table) for s in (0, 5, 10)] == [16, 16, 16]
    assert {"dot", "norm_chosen", "norm_rejected", "cos", "ratio", "case", "pair"} <= set(table[0])
    # Observed changes are computed against the previous check: step 5's rows minus step 0's.
    first = {t["pair"]: t for t in table if t["step"] == 0}
    fifth = [t for t in table if t["step"] == 5]
    up = sum(t["logp_chosen"] > first[t["pair"]]["logp_chosen"] for t in fifth) / 16
    assert checked[1]["entanglement/observed_chosen_up"] == pytest.approx(up)
    assert (out / "entanglement.png").stat().st_size > 10_000


@pytest.mark.slow
def test_drop_and_downweight_weight_the_both_down_pairs(repo, tmp_path, testbed):
    """The per-pair loss weights follow the batch's own predicted cases: downweight with weight 1, and monitor,
    are plain DPO; drop averages the other pairs' losses over the whole batch, replace over the kept pairs.
    A batch of 8 pairs (each pair's gradients on all weights cost ~0.6 s, in every trainer below): 2 both-down
    (pairs 1 and 4), 6 ideal."""
    from align.monitors.entanglement import batch_pair_stats
    from align.recipes.dpo import build_trainer

    plain = build_trainer(dpo_cfg(repo, tmp_path / "a", entanglement_params=["all"]))
    n = 8
    batch = plain.data_collator([plain.train_dataset[i] for i in range(n)])
    plain.model.train()
    loss, out = plain.compute_loss(plain.model, batch, return_outputs=True)
    logps, _, _ = plain._sequence_logps(plain.model, batch)
    cases = [r["case"] for r in batch_pair_stats(logps, [p for p in plain.model.parameters()])]
    assert 0 < cases.count("both_down") < n, cases  # the testbed's synthetic pairs: some, not all
    keep = torch.tensor([c != "both_down" for c in cases], dtype=torch.float32)
    losses = out.losses.detach()
    for action, weight, expected in (("downweight", 1.0, loss.item()), ("monitor", 0.5, loss.item()),
                                     ("drop", 0.5, (losses * keep).mean().item()),
                                     ("replace", 0.5, ((losses * keep).sum() / keep.sum()).item()),
                                     ("downweight", 0.25, (losses * (keep + 0.25 * (1 - keep))).mean().item())):
        t = build_trainer(dpo_cfg(repo, tmp_path / action, entanglement_params=["all"], entanglement_action=action,
                                  entanglement_weight=weight))
        t.model.train()
        assert t.compute_loss(t.model, batch).item() == pytest.approx(expected, rel=1e-5), action
    for c in CASES:
        assert t._metrics["train"][f"entanglement/batch_{c}"][-1] == pytest.approx(cases.count(c) / n)


@pytest.mark.parametrize("overrides,match", [
    ({"entanglement_steps": 0}, "entanglement_steps: must be >= 1"),
    ({"entanglement_action": "reweight"}, "entanglement_action: must be one of"),
    ({"entanglement_weight": 2.0}, "entanglement_weight: must be in"),
    ({"entanglement_probe": "no/such/file.jsonl"}, "entanglement_probe: 'no/such/file.jsonl' is not"),
])
def test_bad_monitor_options_fail_at_start(repo, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        dpo_cfg(repo, tmp_path, **overrides)


@pytest.mark.parametrize("overrides", [{"entanglement_action": "monitor"}, {"objective": "pairnorm"},
                                       {"entanglement_action": "drop", "entanglement_params": ["lora", "lm_head"]}])
def test_batch_pair_gradients_over_frozen_weights_fail_at_start(repo, tmp_path, overrides):
    """With use_peft only the adapter trains: the training pairs' gradients over lm_head (the default subset) do not
    exist in the live graph (before, the first step died with 'One of the differentiated Tensors does not require
    grad'). The probe monitor alone still takes any subset."""
    with pytest.raises(ConfigError) as err:
        dpo_cfg(repo, tmp_path, use_peft=True, **overrides)
    assert str(err.value) == ("entanglement_params: 'lm_head' selects weights a use_peft run does not train; the "
                              "training pairs' gradients (entanglement_action, pairnorm) are taken over trained ones: "
                              "use [lora]")
    dpo_cfg(repo, tmp_path, use_peft=True, entanglement_steps=5)
    dpo_cfg(repo, tmp_path, use_peft=True, **{**overrides, "entanglement_params": ["lora"]})


@pytest.mark.slow
def test_a_subset_with_frozen_weights_is_one_line_when_the_trainer_is_built(repo, tmp_path, testbed):
    """What the config cannot see (a parameter-name substring that matches frozen weights under LoRA) the trainer
    refuses when it is built, before training."""
    from align.recipes.dpo import build_trainer

    cfg = dpo_cfg(repo, tmp_path, use_peft=True, entanglement_action="monitor", entanglement_params=["lora_A"])
    build_trainer(cfg)  # the A factors train: accepted
    cfg = dpo_cfg(repo, tmp_path, use_peft=True, entanglement_action="monitor", entanglement_params=["lora"])
    cfg.entanglement_params = ["q_proj"]  # a name the config check lets through only when it says lora: set after
    with pytest.raises(ConfigError, match=r"^entanglement_params: \['q_proj'\] selects parameters this run does not "
                                          r"train \(base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                          r"base_layer\.weight and \d+ more\); entanglement_action takes the training "
                                          r"pairs' gradients over trained ones: with use_peft use \[lora\]$"):
        build_trainer(cfg)


@pytest.mark.slow
def test_bad_subset_and_probe_rows_fail_before_training(repo, tmp_path, testbed):
    import json

    from align.errors import DataError
    from align.recipes.dpo import build_trainer

    with pytest.raises(ConfigError, match="entanglement_params: subset 'lora' matches no parameter"):
        build_trainer(dpo_cfg(repo, tmp_path, entanglement_steps=5, entanglement_params=["lora"]))
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": "Answer: 2"}) + "\n")
    with pytest.raises(DataError, match="entanglement_probe row 0: chosen and rejected are identical"):
        build_trainer(dpo_cfg(repo, tmp_path, entanglement_steps=5, entanglement_probe=str(probe)))
    probe.write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": "Answer: 2"}) + "\n")
    with pytest.raises(DataError, match="entanglement_probe"):
        build_trainer(dpo_cfg(repo, tmp_path, entanglement_steps=5, entanglement_probe=str(probe)))
