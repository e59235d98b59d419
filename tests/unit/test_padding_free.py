"""Padding-free forwards (issue 18 §3; ``padding_free``, align/logps.py): a padded batch's sequences packed without
their padding, ``position_ids`` restarting per sequence, no attention mask, so transformers' sdpa / eager masks keep
them apart (masking_utils.find_packed_sequence_indices): in one row (flash-attention's layout, exercised here with
sdpa) or in rows as wide as the longest sequence (sdpa / eager). Log-probs, entropies and every gradient equal the
padded forward to 1e-5 of their scale in fp32 (another attention length and matmul shape round differently; RoPE
sees the same position differences), with and without blocks through the head, with LoRA, in the RL and DPO layouts
and through the trainers' passes; the layouts and the padding they save are checked by hand; an attention
implementation that cannot keep packed sequences apart is one line."""

from __future__ import annotations

import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from test_chunked_logps import COMPLETIONS, PROMPTS, assert_near, tiny_llama

import align.logps
from align.errors import ConfigError
from align.logps import Packed, pack, sequence_logps, token_logps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_PROCESS = SimpleNamespace(is_main_process=False, num_processes=1, process_index=0)  # an accelerator stand-in
REL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny models: one intra-op thread (see the conftest fixture)."""


@pytest.fixture(params=["rows", "one-row"])
def layout(request, monkeypatch):
    """Both packed layouts: sdpa's own (rows of the longest sequence's width), and flash-attention's one row, which
    sdpa runs too (a block-diagonal mask over the row)."""
    if request.param == "one-row":
        monkeypatch.setattr(align.logps, "ONE_ROW", ("sdpa", "eager"))
    return request.param


class ForwardShapes:
    """A forward pre-hook recording the ``input_ids`` shape of every forward of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


def test_packed_layout_by_hand():
    """Prompts of 5, 9, 3 and completions of 12, 4, 20 tokens: padded 3 x (9 + 20) = 87 positions, 53 real; one
    row of 53 (39% less), or rows of the longest (23): 23 | 17 + 6 filler | 13 + 10 filler = 69 (21% less)."""
    ids, attn, cmask, width = pack(PROMPTS, COMPLETIONS, pad_id=0)
    assert ids.shape == (3, 29) and width == 9
    p = Packed(ids, attn, 20)
    assert (p.tokens, p.padded_tokens, p.rows, p.width) == (53, 87, 1, 53)
    assert p.ids[0].tolist() == [x for row in zip(PROMPTS, COMPLETIONS) for part in row for x in part]
    assert p.position_ids[0].tolist() == list(range(17)) + list(range(13)) + list(range(23))
    assert torch.equal(p.scored.mask, cmask)  # every completion token, no padding
    # row 0 starts at packed position 0, its last prompt token (predicting the first completion token) is at 4;
    # row 1 starts at 17 (last prompt token 25), row 2 at 30 (last prompt token 32)
    assert p.source.tolist() == list(range(4, 16)) + list(range(25, 29)) + list(range(32, 52))
    assert p.scored.targets.tolist() == [x for c in COMPLETIONS for x in c]
    values = torch.arange(1.0, 37.0)
    unpacked = p.scored.unpack(values)
    assert unpacked.shape == (3, 20) and unpacked[1].tolist() == [13.0, 14.0, 15.0, 16.0] + [0.0] * 16

    p = Packed(ids, attn, 20, one_row=False)  # longest first: row 2 (23), row 0 (17), row 1 (13)
    assert (p.rows, p.width) == (3, 23)
    assert p.ids.tolist() == [PROMPTS[2] + COMPLETIONS[2], PROMPTS[0] + COMPLETIONS[0] + [0] * 6,
                              PROMPTS[1] + COMPLETIONS[1] + [0] * 10]
    assert p.position_ids.tolist() == [list(range(23))] * 3  # the filler continues its row's sequence
    assert p.source.tolist() == list(range(27, 39)) + list(range(54, 58)) + list(range(2, 22))
    # sequences of 6, 5, 4, 3, 2 tokens, first fit longest first into rows of 6: 6 | 5 | 4 + 2 | 3 (24 positions of 30)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4], [0, 0, 0, 1, 2, 3],
                        [0, 0, 0, 0, 1, 2]])
    p = Packed(ids, (ids > 0).long(), 1, one_row=False)
    assert p.ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 1, 2], [1, 2, 3, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1],
                                       [0, 1, 2, 3, 4, 5]]
    assert p.source.tolist() == [4, 9, 14, 19, 16] and p.scored.targets.tolist() == [6, 5, 4, 3, 2]


def run(model, padding_free: bool, block_size, ids, attn, width, cmask):
    model.zero_grad(set_to_none=True)
    logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, block_size=block_size,
                                 padding_free=padding_free)
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps) * cmask
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach() * cmask, entropy * cmask, grads


def assert_same(model, block_size):
    """Sequences of 17, 13, 23, 5 and 2 tokens: rows of 23 are 23 | 17 + 5 | 13 + 2, so rows share too."""
    ids, attn, cmask, width = pack(PROMPTS + [[2, 3], [7]], COMPLETIONS + [[40, 41, 42], [50]], pad_id=0)
    assert Packed(ids, attn, ids.shape[1] - width, one_row=False).rows == 3
    padded = run(model, False, block_size, ids, attn, width, cmask)
    packed = run(model, True, block_size, ids, attn, width, cmask)
    assert padded[0].min() < -1 and len(padded[2]) > 0
    assert_near(packed[0], padded[0], REL, "log-probs")
    assert_near(packed[1], padded[1], REL, "entropies")
    assert packed[2].keys() == padded[2].keys()
    for name, g in packed[2].items():
        assert g.abs().max() > 0, name
        assert_near(g, padded[2][name], REL, name)


@pytest.mark.parametrize("block_size", [0, 7, "auto"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_equal_to_the_padded_forward(impl, block_size, layout):
    model = tiny_llama()
    model.config._attn_implementation = impl
    assert_same(model, block_size)


def test_equal_with_lora(layout):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    assert_same(model, 7)


def test_packed_sequences_do_not_see_each_other():
    """Row 1's log-probs do not move when rows 0 and 2 change; packed without restarting positions (one long
    sequence) they do, so the check can fail."""
    model = tiny_llama()
    ids, attn, _, width = pack(PROMPTS, COMPLETIONS, pad_id=0)
    other = [[7] * len(p) for p in PROMPTS], [[9] * len(c) for c in COMPLETIONS]
    ids2, attn2, _, _ = pack([other[0][0], PROMPTS[1], other[0][2]], [other[1][0], COMPLETIONS[1], other[1][2]], 0)
    with torch.no_grad():
        a = token_logps(model, ids, attn, width, padding_free=True)[1, :4]
        b = token_logps(model, ids2, attn2, width, padding_free=True)[1, :4]
        assert_near(b, a, 1e-6, "row 1")
        p = Packed(ids, attn, 20)
        leaked = model(input_ids=p.ids, position_ids=torch.arange(p.tokens)[None]).logits[0, 25:29]
        alone = model(input_ids=p.ids, position_ids=p.position_ids).logits[0, 25:29]
    assert (leaked - alone).abs().max() > 1e-3  # vs 1e-6 above


def test_sequence_logps_right_padded_pairs(layout):
    """The DPO layout: [chosen; rejected] right-padded, completions starting at different columns."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (4, 30), generator=gen)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (start, end) in enumerate(((10, 30), (14, 22), (22, 27), (4, 8))):  # rows of 30: 30 | 27 | 22 + 8
        attn[row, :end] = 1
        mask[row, start:end] = True
    ids = ids * attn  # pad id 0
    out = []
    for padding_free in (False, True):
        model.zero_grad(set_to_none=True)
        logps, lengths, entropy = sequence_logps(model, ids, attn, mask, 5, padding_free)
        (logps * torch.tensor([1.0, -0.5, 2.0, 0.3])).sum().backward()
        out.append((logps.detach(), lengths, entropy, model.lm_head.weight.grad.clone(),
                    model.model.embed_tokens.weight.grad.clone()))
    assert out[0][1].tolist() == out[1][1].tolist() == [20.0, 8.0, 5.0, 4.0]
    for got, want, what in zip(out[1], out[0], ("log-probs", "lengths", "entropy", "lm_head", "embed"), strict=True):
        assert_near(got, want, REL, what)


def test_an_attention_implementation_that_cannot_pack_is_one_line():
    model = tiny_llama()
    model.config._attn_implementation = "paged|eager"  # paged attention for serving: no mask from position_ids
    ids, attn, _, width = pack(PROMPTS, COMPLETIONS, pad_id=0)
    rec = ForwardShapes(model)
    with pytest.raises(ConfigError) as err:
        token_logps(model, ids, attn, width, padding_free=True)
    assert rec.shapes == []  # refused before the forward
    assert str(err.value) == ("padding_free: the model's attention implementation 'paged|eager' cannot keep packed "
                              "sequences apart (supported: sdpa, eager, flex_attention, flash_attention_2, "
                              "flash_attention_3, flash_attention_4); set attn_implementation to one of them, or "
                              "padding_free=false")
    model.config._attn_implementation = "paged|sdpa"  # transformers runs sdpa for it: allowed
    token_logps(model, ids, attn, width, padding_free=True)
    assert rec.shapes == [(3, 23)]


# --- the trainers' passes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(testbed):
    from align.modeling import load_model, load_tokenizer

    return load_model(str(testbed.policy)), load_tokenizer(str(testbed.policy))


def test_rl_old_and_reference_passes(policy, layout):
    """The RL old / reference log-prob passes (:class:`align.trainers.rounds.RoundBuilder`): five samples of 15, 5,
    35, 12 and 3 tokens in the token-budget micro-batches [2, 0] and [3, 1, 4] (2 x 35 and 3 x 12 padded: 106
    positions for 70 tokens) are forwards of rows 35 | 15 and 12 | 5 + 3 with sdpa (2 x 35 and 2 x 12: 94), one row
    of 50 and of 20 in flash-attention's layout (70: no padding); the values equal the padded passes'."""
    from align.trainers.rounds import RoundBuilder, Sample

    model, tok = policy
    assert model.config._attn_implementation == "sdpa"
    gen = torch.Generator().manual_seed(0)
    sizes = [(5, 10), (3, 2), (5, 30), (4, 8), (2, 1)]
    results = {}
    for padding_free in (False, True):
        gen.manual_seed(0)
        samples = []
        for g, (p, c) in enumerate(sizes):
            ids = torch.randint(2, 384, (p + c,), generator=gen).tolist()
            samples.append(Sample(g, 0, 0, 0.0, {}, c, False, ids[:p], ids[p:], minibatch=1))
        args = SimpleNamespace(allocator="uniform", advantage="grpo", scale_rewards="group", accept_threshold=0.5,
                               grad_norm_monitor_steps=None, num_minibatches=2, num_iterations=1, updates_per_round=2,
                               beta=0.1, device="cpu", max_tokens_per_micro_batch=80, micro_batch_size=64,
                               logits_block_size="auto", padding_free=padding_free)
        builder = RoundBuilder(args, ONE_PROCESS, None, None, None, tok, [], tok.pad_token_id, policy=lambda: model,
                               reference=lambda: (model, nullcontext()), step=lambda: 0)
        rec = ForwardShapes(model)
        try:
            builder._precompute_logps(samples, 0)
        finally:
            rec.handle.remove()
        results[padding_free] = samples, rec.shapes
    assert results[False][1] == [(2, 35), (3, 12)] * 2  # the old log-probs pass, then the reference pass
    assert results[True][1] == ([(2, 35), (2, 12)] if layout == "rows" else [(1, 50), (1, 20)]) * 2
    for packed, padded in zip(results[True][0], results[False][0], strict=True):
        assert packed.old_logps.shape == (packed.length,)
        assert_near(packed.old_logps, padded.old_logps, REL, "old log-probs")
        assert_near(packed.ref_logps, padded.ref_logps, REL, "reference log-probs")


def test_dpo_loss_and_gradient(testbed, tmp_path):
    """One DPO batch of the testbed config (8 pairs, 4 of them cut short): the loss and the gradient of every weight
    are the padded forward's; the forward packs the 16 sequences into fewer rows."""
    from align.config import load_config
    from align.recipes.dpo import DPORecipeConfig, build_trainer

    over = {"output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True, "max_train_samples": 8,
            "precompute_ref_logps": False, "per_device_train_batch_size": 8}
    trainer = build_trainer(load_config(DPORecipeConfig, os.path.join(REPO, "configs/dpo/testbed.yaml"), over))
    rows = [trainer.train_dataset[i] for i in range(8)]
    for r in rows[:4]:  # the testbed's pairs are all about as long: cut half of them short, so there is padding
        r["prompt_ids"], r["chosen_ids"], r["rejected_ids"] = r["prompt_ids"][-6:], r["chosen_ids"][:2], \
            r["rejected_ids"][:3]
    batch = trainer.data_collator(rows)
    real, padded = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    assert padded == 16 * batch["input_ids"].shape[1] and real < 0.75 * padded
    out = {}
    for padding_free in (False, True):
        trainer.args.padding_free = padding_free
        trainer.model.zero_grad(set_to_none=True)
        rec = ForwardShapes(trainer.model)
        try:
            loss = trainer.compute_loss(trainer.model, batch)
        finally:
            rec.handle.remove()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        out[padding_free] = loss.detach(), grads, rec.shapes
    rows, width = out[True][2][0]  # sdpa: rows as wide as the longest sequence; the 8 cut sequences share rows
    assert out[False][2][0] == tuple(batch["input_ids"].shape)
    assert width == int(batch["attention_mask"].sum(-1).max()) and real <= rows * width and rows <= 12
    assert out[True][0].item() > 0.1
    assert_near(out[True][0], out[False][0], REL, "loss")
    assert_near(out[True][1], out[False][1], REL, "gradient")
