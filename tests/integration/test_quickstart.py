"""`align quickstart` end to end, and the verifier-labelled pairs it trains on."""

import json

import pytest

from align.data.sampled_pairs import sampled_pairs
from align.rewards.math import extract_answer, is_correct
from align.testbed.tasks import rl_rows


def test_sampled_pairs_are_policy_mistakes_against_right_answers(testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(testbed.policy)
    tok = AutoTokenizer.from_pretrained(testbed.policy)
    rows = rl_rows(n=48, split="train", seed=3)
    pairs = sampled_pairs(model, tok, rows, is_correct, reference=lambda r: r["solution"], k=4, max_new_tokens=16)
    assert 24 <= len(pairs) <= 48  # the policy is right ~25% of the time: most prompts have a wrong sample
    for p in pairs:
        assert is_correct(p["chosen"], p["answer"]) and not is_correct(p["rejected"], p["answer"])
        assert p["chosen"][0]["role"] == "assistant"
    assert any(extract_answer(p["rejected"]) is not None for p in pairs)  # well-formed wrong answers
    again = sampled_pairs(model, tok, rows, is_correct, reference=lambda r: r["solution"], k=4, max_new_tokens=16)
    assert again == pairs  # seeded


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, testbed):
    from align.quickstart import quickstart

    summary = quickstart(str(tmp_path / "qs"))
    acc = summary["held_out_accuracy"]
    assert acc["random_init"]["accuracy"] == 0.0
    assert acc["sft"]["accuracy"] > 0.15
    # RPO on the policy's own verifier pairs: +5.0 points on an Intel-built testbed (45.2% -> 50.2%, 2026-11-24) but
    # -2.8 on an AMD-built one (52.1% -> 49.3%, 2026-12-01; docs/testbed.md); what holds on both: the policy is not
    # broken (the SFT term holds the chosen answers up) and the held-out preference accuracy rises above chance
    assert acc["rpo"]["accuracy"] > acc["sft"]["accuracy"] - 0.05
    assert summary["held_out_preferences"]["eval_rewards/accuracies"] > 0.5
    out = tmp_path / "qs"
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "dpo"}
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["held_out_accuracy"]["rpo"] == acc["rpo"]
    card = (out / "dpo" / "README.md").read_text()  # the aligned model's card, as every `align train` run writes
    assert "align train dpo --config quickstart" in card and "rpo" in card.lower()
