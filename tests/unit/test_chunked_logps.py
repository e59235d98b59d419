"""Chunked log-probs and entropies (issue 18 §2, §4; align/lm_head.py): the hidden states go through the output
head a block of tokens at a time, with the logits recomputed in the backward pass. Log-probs, entropies and the
gradients of every parameter equal the unchunked path (block_size=0) in fp32 to 1e-6 of their scale (2e-6 for
gradients; see :func:`assert_near`), for several block sizes, with LoRA and with tied embeddings; no tensor of the
full [batch, tokens, vocab] size is ever created; a head that cannot be split falls back with one warning naming
why."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import align.lm_head
from align.logps import pack, sequence_logps, token_logps

VOCAB = 1000
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23]]
COMPLETIONS = [list(range(100, 112)), [300, 301, 302, 303], list(range(500, 520))]


def tiny_llama(tie: bool = False, vocab: int = VOCAB, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # logits of order 1 (HF's init gives ~0.1: a nearly uniform softmax)
        model.lm_head.weight.normal_(0, 0.1)
    return model


def assert_near(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6, what: str = "") -> None:
    """``max |got - want| <= rel * max(1, max |want|)``: equal up to fp32 rounding. A block's logits come from a
    matmul of another shape than the batch's (other BLAS kernels), so single values differ by an ulp or two
    (measured: 9.5e-7 on log-probs of size 8); gradients sum those over every position (measured: 1.0e-6 of the
    largest entry), hence ``rel=2e-6`` for them. A wrong formula is off by far more."""
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max |difference| {err:.3g} > {rel:g} x {scale:.3g}"


class Shapes(TorchDispatchMode):
    """Records the op and shape of every new tensor (not a view) an aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.ops.append((func.__name__, tuple(t.shape)))
        return out

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for _, s in self.ops]

    def logits_rows(self, vocab: int) -> int:
        """The most rows of any recorded ``[..., vocab]`` tensor."""
        return max((math.prod(s[:-1]) for s in self.shapes if s and s[-1] == vocab), default=0)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(align.lm_head, "warned_reasons", set())


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny models: one intra-op thread (see the conftest fixture)."""


def batch():
    ids, attn, cmask, width = pack(PROMPTS, COMPLETIONS, pad_id=0)
    return ids, attn, cmask, width


def run(model, block_size: int):
    """Per-token log-probs and entropies, and the gradient of every trainable parameter of a weighted sum of the
    completion log-probs (weights vary per token, so every position's gradient counts)."""
    ids, attn, cmask, width = batch()
    model.zero_grad(set_to_none=True)
    with Shapes() as rec:
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, block_size=block_size)
        weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps) * cmask
        (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropy, grads, rec


def assert_same(model, block_sizes=(1, 7, 64)):
    """64 is more than a row's 20 completion positions and the batch's 36 completion tokens: one block. Only the
    completion tokens go through the head in blocks (12 + 4 + 20 = 36 of the 3 x 20 positions: not the padding)."""
    ids, _, cmask, width = batch()
    n = int(cmask.sum())
    assert (n, ids.shape[0] * (ids.shape[1] - width)) == (36, 60)
    full_logps, full_entropy, full_grads, full_rec = run(model, 0)
    assert full_rec.logits_rows(VOCAB) >= 60  # the unchunked path does build the [B, C, V] logits
    assert full_entropy.max() < math.log(VOCAB) - 0.1 and full_logps[cmask].max() < 0  # not a uniform softmax
    assert full_logps[~cmask].abs().max() == 0 and full_entropy[~cmask].abs().max() == 0  # padding: 0
    assert len(full_grads) > 0 and all(g.abs().sum() > 0 for g in full_grads.values())
    for block in block_sizes:
        logps, entropy, grads, rec = run(model, block)
        assert rec.logits_rows(VOCAB) == min(block, n), block  # one block's logits at a time, never more
        assert_near(logps, full_logps, what=f"log-probs, block {block}")
        assert_near(entropy, full_entropy, what=f"entropies, block {block}")
        assert grads.keys() == full_grads.keys()
        for name, g in grads.items():
            assert_near(g, full_grads[name], 2e-6, f"{name}, block {block}")


def test_equal_to_full_logits_for_every_block_size():
    assert_same(tiny_llama())


def test_equal_with_tied_embeddings():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same(model, (7, 64))


def test_equal_with_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    assert not model.get_output_embeddings().weight.requires_grad  # the head is frozen: no weight gradient path
    assert_same(model, (1, 7, 64))


def test_a_head_with_bias_directly():
    """:func:`chunked_logps` on a biased head against autograd through ``log_softmax``: values and the gradients
    of the hidden states, the weight and the bias."""
    from align.lm_head import chunked_logps

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50)
    with torch.no_grad():
        head.bias.normal_(0, 1, generator=gen)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=gen)
    weights = torch.rand(2, 9, generator=gen)
    logp_all = torch.log_softmax(head(hidden), -1)
    want = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1)
    want_grads = torch.autograd.grad((want * weights).sum(), (hidden, head.weight, head.bias))
    got, entropy = chunked_logps(hidden, head, targets, 4, with_entropy=True)
    grads = torch.autograd.grad((got * weights).sum(), (hidden, head.weight, head.bias))
    assert got.shape == entropy.shape == (2, 9) and not entropy.requires_grad
    assert_near(got, want, what="log-probs")
    assert_near(entropy, want_entropy.detach(), what="entropy")
    for g, w, what in zip(grads, want_grads, ("hidden", "weight", "bias"), strict=True):
        assert_near(g, w, 2e-6, what)
        assert w.abs().max() > 0.1


def test_head_gradient_of_one_sequence_skips_the_other_blocks():
    """Gradients of one row alone (the entanglement monitor's use): blocks of other rows get zero gradient and
    are skipped; the result still equals the unchunked one."""
    model = tiny_llama()
    ids, attn, _, width = batch()  # the 36 completion tokens: row 1's 4 are positions 12..15, in blocks 2 and 3 of 5
    per_row = []
    for block in (0, 5):
        model.zero_grad(set_to_none=True)
        row = token_logps(model, ids, attn, width, block_size=block)[1]
        with Shapes() as rec:
            row.sum().backward()
        per_row.append(model.lm_head.weight.grad.clone())
    assert [s for op, s in rec.ops if op == "exp_.default"] == [(5, VOCAB)] * 2  # 2 of the 8 blocks recomputed
    assert_near(per_row[1], per_row[0], 2e-6, "lm_head.weight")


def test_result_does_not_depend_on_the_batch_split():
    """What two data-parallel processes compute: rows 0 and 1-2 in separate passes (other block boundaries), the
    gradients summed (DDP averages what each process summed), equal the unchunked pass over all three rows."""
    model = tiny_llama()
    ids, attn, cmask, width = batch()
    weights = torch.linspace(0.5, 1.5, cmask.numel()).view(cmask.shape) * cmask
    full_logps, _, full_grads, _ = run(model, 0)
    model.zero_grad(set_to_none=True)
    parts = []
    for rows in (slice(0, 1), slice(1, 3)):
        logps = token_logps(model, ids[rows], attn[rows], width, block_size=7)
        (logps * weights[rows]).sum().backward()
        parts.append(logps.detach())
    assert_near(torch.cat(parts), full_logps, what="log-probs")
    for name, p in model.named_parameters():
        assert_near(p.grad, full_grads[name], 2e-6, name)


def test_sequence_logps_equals_completion_logps_of_the_full_logits():
    """The preference trainer's path (completions starting at different columns) against the logits itself."""
    from align.logps import completion_logps

    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, start in enumerate((10, 14, 22, 12)):
        mask[row, start : 30 - row] = True
    with torch.no_grad():
        want = completion_logps(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
        for block in (0, 3, 64):
            got = sequence_logps(model, ids, attn, mask, block)
            for a, b, what in zip(got, want, ("log-probs", "lengths", "entropy"), strict=True):
                assert_near(a, b, what=f"{what}, block {block}")
    assert want[1].tolist() == [20.0, 15.0, 6.0, 15.0]


def test_no_tensor_of_the_full_logits_size_at_a_50k_vocabulary():
    """B=2, T=512, V=50,000: the blocked pass (block 64) never creates a tensor with more than 64 x V elements,
    forward or backward; the unchunked pass creates the full [2, 496, V] logits (so the check can fail)."""
    vocab, block = 50_000, 64
    model = tiny_llama(vocab=vocab, layers=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (16,), generator=gen).tolist() for _ in range(2)]
    completions = [torch.randint(1, vocab, (496,), generator=gen).tolist() for _ in range(2)]
    ids, attn, cmask, width = pack(prompts, completions, pad_id=0)
    assert ids.shape == (2, 512)
    with Shapes() as fwd:
        logps, _ = token_logps(model, ids, attn, width, with_entropy=True, block_size=block)
    with Shapes() as bwd:
        (logps * cmask).sum().backward()
    largest = max(math.prod(s) for s in fwd.shapes + bwd.shapes)
    assert largest == block * vocab  # one block's logits: 3.2M elements, vs 49.6M for the batch
    assert fwd.logits_rows(vocab) == block and bwd.logits_rows(vocab) == block  # the backward recomputes blocks
    with torch.no_grad(), Shapes() as full:  # the check can fail: the unchunked path, on 2 x (16 + 48) tokens
        token_logps(model, ids[:, : width + 48], attn[:, : width + 48], width, block_size=0)
    assert full.logits_rows(vocab) == 2 * 49  # [B, C + 1, V]


class ScaledHead(torch.nn.Module):
    """A custom head: a Linear whose logits are halved (not a plain nn.Linear, so it cannot be split)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return self.linear(hidden) / 2


@pytest.mark.parametrize("case", ["custom-head", "softcapping", "lora-on-head"])
def test_unsplittable_head_falls_back_with_one_warning(case, caplog):
    model = tiny_llama()
    if case == "custom-head":
        model.lm_head = ScaledHead(model.lm_head)
        reason = f"the output head is a {ScaledHead.__module__}.ScaledHead, not a torch.nn.Linear"
    elif case == "softcapping":
        model.config.final_logit_softcapping = 30.0
        reason = "the model's config sets final_logit_softcapping=30.0 (a transform of the logits after the head)"
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
        reason = "the output head is a peft.tuners.lora.layer.Linear, not a torch.nn.Linear"
    ids, attn, _, width = batch()
    with torch.no_grad():
        full = token_logps(model, ids, attn, width, block_size=0)
        with caplog.at_level(logging.WARNING, logger="align.lm_head"):
            first = token_logps(model, ids, attn, width, block_size=8)
            second = token_logps(model, ids, attn, width, block_size=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "align.lm_head"]
    assert lines == [f"logits_block_size: {reason}; computing the full logits instead (unchunked)"]
    assert torch.equal(first, full) and torch.equal(second, full)


def test_block_size_zero_never_warns(caplog):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    ids, attn, _, width = batch()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="align.lm_head"):
        token_logps(model, ids, attn, width, block_size=0)
    assert [r for r in caplog.records if r.name == "align.lm_head"] == []


def test_negative_block_size_is_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from align.recipe import get_recipe, main

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    code = main(get_recipe("grpo"), ["--config", str(repo / "configs/grpo/testbed.yaml"), f"output_dir={tmp_path}/o",
                                     "logits_block_size=-1"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: logits_block_size: must be >= 0 (0 = off) or auto, got -1\n"
    assert not (tmp_path / "o").exists()


def test_every_recipe_config_has_the_key_with_its_default():
    from align.lm_head import LOGITS_BLOCK_SIZE, block_tokens
    from align.trainers.online_args import OnlineConfig
    from align.trainers.preference import PreferenceConfig
    from align.trainers.rl_args import RLConfig
    from align.trainers.sft import SFTArguments

    for cls in (OnlineConfig, PreferenceConfig, RLConfig, SFTArguments):
        defaults = {f.name: f.default for f in cls.__dataclass_fields__.values()}
        assert defaults["logits_block_size"] == "auto" and defaults["padding_free"] is False
    assert LOGITS_BLOCK_SIZE == 512 and block_tokens(0, 151_936) == 0 and block_tokens(7, 151_936) == 7
    # auto: at most 512 tokens and 2**25 logits (128 MiB in fp32) per block
    assert [block_tokens("auto", v) for v in (151_936, 128_256, 65_536, 32_000, 300)] == [220, 261, 512, 512, 512]
    assert 220 * 151_936 * 4 <= 128 * 2**20 < 221 * 151_936 * 4


def test_auto_is_512_tokens_capped_at_the_tokens_scored():
    """``auto`` at a small vocabulary gives blocks of 512 (one block when a pass scores fewer positions), the same
    values."""
    model = tiny_llama(vocab=300, layers=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 300, (2, 700), generator=gen)
    attn = torch.ones_like(ids)
    width = 100  # 2 x 600 = 1,200 scored positions: blocks of 512, 512, 176
    with torch.no_grad(), Shapes() as rec:
        auto = token_logps(model, ids, attn, width, block_size="auto")
    assert [s for op, s in rec.ops if op == "amax.default"] == [(512,), (512,), (176,)]
    with torch.no_grad():
        assert_near(auto, token_logps(model, ids, attn, width, block_size=0), what="log-probs")
        with Shapes() as rec:
            token_logps(model, ids[:, :130], attn[:, :130], width, block_size="auto")
    assert [s for op, s in rec.ops if op == "amax.default"] == [(60,)]  # 2 x 30: one block


@pytest.mark.parametrize(("recipe", "value", "code"), [("dpo", "64", 0), ("dpo", "auto", 0), ("grpo", "80", 0),
                                                       ("dpo", "65", 2), ("grpo", "81", 2)])
def test_an_explicit_block_size_up_to_the_longest_sequence(recipe, value, code, tmp_path):
    """The testbed configs: DPO ``max_length: 64``, GRPO 64 + 16 prompt and completion tokens; the value equal to
    the longest is accepted, one more is one line (exit 2 through the recipe: tests/unit/test_bad_input_config.py)."""
    from pathlib import Path

    from align.config import load_config
    from align.errors import ConfigError
    from align.recipe import get_recipe

    repo = Path(__file__).resolve().parents[2]
    cls = get_recipe(recipe).config_class
    over = {"output_dir": str(tmp_path / "o"), "logits_block_size": value}
    if code == 0:
        config = load_config(cls, repo / f"configs/{recipe}/testbed.yaml", over)
        assert config.logits_block_size == (value if value == "auto" else int(value))
        return
    with pytest.raises(ConfigError) as err:
        load_config(cls, repo / f"configs/{recipe}/testbed.yaml", over)
    longest = {"dpo": "64 tokens (max_length 64)",
               "grpo": "80 tokens (max_prompt_length 64 + max_completion_length 16)"}[recipe]
    assert str(err.value) == (f"logits_block_size: {value} is larger than the longest sequence, {longest}; use at "
                              f"most {longest.split()[0]}, auto or 0 (off)")
