"""How many vocabulary-sized tensors a log-prob pass holds at once (issue 18 §2, §4; align/lm_head.py): the blocked
pass works on each block's logits in place and frees them before the next block, so at any moment one
``[block, vocab]`` tensor is alive, forward (log-probs and entropies) and backward; the unchunked path holds
several copies of the batch's logits (so the count can fail)."""

from __future__ import annotations

import weakref

import pytest
import torch
from test_chunked_logps import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from align.lm_head import EXP_ROWS
from align.logps import pack, token_logps

VOCAB, BLOCK = 20_000, 256


class LiveLarge(TorchDispatchMode):
    """Counts the tensors of at least ``size`` elements that are alive at once (made by an operator while the mode
    is on; a tensor leaves the count when it is freed), and the most at any moment."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.live, self.most = size, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and not func.is_view:
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = weakref.finalize(t, self.live.pop, key, None)
                    self.most = max(self.most, len(self.live))
        return out


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny models: one intra-op thread (see the conftest fixture)."""


def batch():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (8,), generator=gen).tolist() for _ in range(2)]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (600, 420)]
    return pack(prompts, completions, pad_id=0)


def test_one_block_of_logits_alive_at_a_time():
    """2 rows x 600 scored positions in blocks of 256: 5 blocks, never two [256, V] tensors at once; the
    exponentials run EXP_ROWS rows at a time (below the counted size); hidden 32, so the head's [V, 32] weight
    gradient is not counted either."""
    assert EXP_ROWS * VOCAB < BLOCK * VOCAB // 2 and 32 * VOCAB < BLOCK * VOCAB // 2
    model = tiny_llama(vocab=VOCAB, layers=1)
    ids, attn, cmask, width = batch()
    with LiveLarge(BLOCK * VOCAB // 2) as fwd:
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, block_size=BLOCK)
    with LiveLarge(BLOCK * VOCAB // 2) as bwd:
        (logps * cmask).sum().backward()
    assert (fwd.most, bwd.most) == (1, 1)
    assert model.lm_head.weight.grad.abs().max() > 0 and entropy[cmask].min() > 0
    with torch.no_grad(), LiveLarge(BLOCK * VOCAB // 2) as full:  # the full logits: the count can fail
        token_logps(model, ids, attn, width, with_entropy=True, block_size=0)
    assert full.most >= 2  # the batch's logits and the temporaries of their log-normaliser and entropy
