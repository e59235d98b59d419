"""The HF rollout engine: per-completion random streams, ragged counts, sampling log-probs."""

import pytest
import torch

from align.evaluation import generate as greedy_generate
from align.logps import pack, token_logps
from align.modeling import load_model, load_tokenizer
from align.rollout import HFEngine, SamplingParams
from align.rollout.hf import filter_logits

QUESTIONS = ["What is 3+4?", "What is 7*8?", "What is 9-2?", "What is 6*6?"]


@pytest.fixture(scope="module")
def policy(testbed):
    tok = load_tokenizer(str(testbed.policy))
    model = load_model(str(testbed.policy))
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ids = [tok(t, add_special_tokens=False)["input_ids"]
           for t in (tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts)]
    return model, tok, prompts, ids


def test_ragged_counts_order_and_finish(policy):
    model, tok, _, ids = policy
    out = HFEngine(model, tok, batch_size=3).generate(ids, [2, 0, 3, 1], SamplingParams(max_new_tokens=12, seed=3))
    assert out.prompt_index == [0, 0, 2, 2, 2, 3] and out.sample_index == [0, 1, 0, 1, 2, 0]
    assert [out.prompt_index.count(i) for i in range(4)] == [2, 0, 3, 1]
    for c, fin, lp in zip(out.completion_ids, out.finish_reason, out.sampling_logps, strict=True):
        assert len(lp) == len(c) and len(c) <= 12
        assert (fin == "stop") == (c[-1] == tok.eos_token_id)
    short = HFEngine(model, tok).generate(ids, [2, 2, 2, 2], SamplingParams(max_new_tokens=2, seed=3))
    assert set(short.finish_reason) == {"length"} and all(len(c) == 2 for c in short.completion_ids)


def test_completion_depends_only_on_seed_key_and_index(policy):
    model, tok, _, ids = policy
    sp = SamplingParams(max_new_tokens=12, seed=11)
    together = HFEngine(model, tok, batch_size=64).generate(ids, [4, 4, 4, 4], sp, keys=["a", "b", "c", "d"])
    alone = HFEngine(model, tok, batch_size=1).generate(ids[2:3], [4], sp, keys=["c"])
    assert together.completion_ids[8:12] == alone.completion_ids
    again = HFEngine(model, tok, batch_size=5).generate(ids, [4, 4, 4, 4], sp, keys=["a", "b", "c", "d"])
    assert again.completion_ids == together.completion_ids
    other = HFEngine(model, tok).generate(ids, [4, 4, 4, 4], SamplingParams(max_new_tokens=12, seed=12),
                                          keys=["a", "b", "c", "d"])
    assert other.completion_ids != together.completion_ids
    # the 16 samples are not all one answer: it really samples
    assert len({tuple(c) for c in together.completion_ids}) > 4


def test_sampling_logps_equal_trainer_logps(policy):
    model, tok, _, ids = policy
    out = HFEngine(model, tok).generate(ids, [3, 3, 3, 3], SamplingParams(max_new_tokens=12, seed=5))
    input_ids, attention_mask, _, width = pack(out.prompt_ids, out.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        lp = token_logps(model, input_ids, attention_mask, width)
    for r, sampled in enumerate(out.sampling_logps):
        assert lp[r, : len(sampled)].tolist() == pytest.approx(sampled, abs=1e-4)


def test_greedy_matches_hf_generate(policy):
    model, tok, prompts, ids = policy
    out = HFEngine(model, tok).generate(ids, [1, 1, 1, 1], SamplingParams(max_new_tokens=16, temperature=0.0))
    texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
    assert texts == greedy_generate(model, tok, prompts, max_new_tokens=16)
    top1 = HFEngine(model, tok).generate(ids, [1, 1, 1, 1], SamplingParams(max_new_tokens=16, top_k=1, seed=9))
    assert top1.completion_ids == out.completion_ids


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is below, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]


def test_bad_requests(policy):
    model, tok, _, ids = policy
    engine = HFEngine(model, tok)
    with pytest.raises(ValueError, match="n_per_prompt"):
        engine.generate(ids, [1, 2], SamplingParams())
    with pytest.raises(ValueError, match="keys"):
        engine.generate(ids, [1, 1, 1, 1], SamplingParams(), keys=["a"])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_greedy_entropy_without_output_logits(policy):
    """The evaluation's entropy metric, recorded step by step by a logits processor, equals the one from the full
    ``output_logits`` stack (every position up to and including eos), and the completions are unchanged."""
    from align.logps import token_entropy

    model, tok, prompts, _ = policy
    completions, entropy = greedy_generate(model, tok, prompts, max_new_tokens=16, batch_size=3, with_entropy=True)
    assert completions == greedy_generate(model, tok, prompts, max_new_tokens=16, batch_size=3)
    total, count = 0.0, 0
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    for s in range(0, len(texts), 3):
        enc = tok(texts[s:s + 3], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[:, enc["input_ids"].shape[1]:]
        ent = token_entropy(torch.stack(gen.logits, 1).float())
        is_eos = (new == tok.eos_token_id).long()
        alive = (is_eos.cumsum(1) - is_eos) == 0
        total, count = total + (ent * alive).sum().item(), count + int(alive.sum())
    tok.padding_side = side
    assert entropy == pytest.approx(total / count, rel=1e-6) and entropy > 0
