"""Gradients of sequence log-probs over a parameter subset: the shared helpers of the monitors (GVM's gradient
norms, :mod:`align.monitors.grad_norm`, and gradient entanglement, :mod:`align.monitors.entanglement`).

Exact per-sequence gradients: one forward per chunk of sequences, then one ``autograd.grad`` per sequence over that
chunk's graph (sequences of a batch do not interact).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from align.errors import ConfigError


def select_parameters(model, patterns: Sequence[str],
                      key: str = "gvm_grad_params") -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters whose name contains any of ``patterns`` (``["all"]`` selects every one)."""
    named = list(model.named_parameters())
    if list(patterns) == ["all"]:
        return named
    chosen = [(n, p) for n, p in named if any(pat in n for pat in patterns)]
    if not chosen:
        sample = ", ".join(n for n, _ in named[:4])
        raise ConfigError(f"{key}: {list(patterns)} matches no parameter of the model (names look like: {sample}, ...)")
    return chosen


@contextmanager
def only_trainable(model, params):
    """Only ``params`` require grad for the duration (restored after), so the forward records a graph only from
    the first operation that touches them: for an output-layer subset the body runs graph-free."""
    chosen = {id(p) for p in params}
    every = list(model.parameters())
    before = [p.requires_grad for p in every]
    for p in every:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in zip(every, before, strict=True):
            p.requires_grad_(flag)


def sequence_grads(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                   params: Sequence[torch.nn.Parameter], chunk: int = 8,
                   block_size: int | str = "auto"):
    """Yields ``(∇_params S_θ(completion | prompt) flattened into one fp32 vector, S_θ)`` for each (prompt,
    completion) pair, in order: one forward per chunk, one ``autograd.grad`` per sequence (exact; the
    sequences of a chunk do not interact). Parameters outside ``params`` get no gradient. Consume it whole or
    close it: the model's training mode and ``requires_grad`` flags are restored when it finishes.
    ``chunk``: sequences per forward; each ``autograd.grad`` walks the chunk's whole graph, so keep it small
    for deep subsets (embeddings) and larger for output-layer ones. ``block_size``: tokens per block through the
    lm head (:func:`align.logps.token_logps`): the run's ``logits_block_size``."""
    from align.logps import pack, token_logps

    params = list(params)
    device = params[0].device
    was_training = model.training
    model.eval()  # no dropout: the gradient of the sequence's log-prob itself
    try:
        with only_trainable(model, params), torch.enable_grad():
            for s in range(0, len(prompts), chunk):
                ids, attn, cmask, width = pack(prompts[s : s + chunk], completions[s : s + chunk], pad_id, device)
                seq = (token_logps(model, ids, attn, width, block_size=block_size) * cmask).sum(-1)
                for b in range(seq.shape[0]):
                    yield flat_grad(seq[b], params, retain_graph=b < seq.shape[0] - 1), float(seq[b].detach())
    finally:
        model.train(was_training)


def flat_grad(output: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool = True) -> torch.Tensor:
    """∇_params output as one flat fp32 vector (zeros for parameters the output does not depend on)."""
    grads = torch.autograd.grad(output, list(params), retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                      for g, p in zip(grads, params, strict=True)])
