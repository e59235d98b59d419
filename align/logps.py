"""Log-probs and entropies of tokens: the one place they are computed (training losses, reference and old
log-probs, monitors, evaluation).

From a model (:func:`token_logps`, :func:`sequence_logps`) the scored positions' hidden states go through the
output head ``block_size`` tokens at a time (:mod:`align.lm_head`), never as full ``[batch, tokens, vocab]``
logits; ``block_size=0``, or a head that cannot be split (one warning), computes the full logits as before.
"""

from __future__ import annotations

import functools

import torch

from align.lm_head import LOGITS_BLOCK_SIZE, chunked_logps, head_input, split_head, unwrap, warn_unchunked


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Summed log-probs, token counts and mean entropy of the completion tokens of each sequence.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; only positions whose target is a completion
    token count. Returns ``(logps [N], lengths [N], entropy)``: ``entropy`` is the mean per-token
    entropy of the policy over all scored positions (detached, for logging).
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    log_norm = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    logps = (token_logps * mask).sum(-1)
    lengths = mask.sum(-1)
    with torch.no_grad():
        entropy = token_entropy(logits, log_norm)
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
    return logps, lengths, mean_entropy


def token_entropy(logits: torch.Tensor, log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The entropy (nats, detached) of ``softmax(logits)`` at each position: ``logits [..., V]`` -> ``[...]``.
    ``log_norm``: ``logsumexp(logits, -1)`` when the caller has it already."""
    with torch.no_grad():
        logits = logits.detach()
        log_norm = torch.logsumexp(logits, dim=-1) if log_norm is None else log_norm.detach()
        return log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def pack(prompts, completions, pad_id: int, device=None):
    """A batch for per-token scoring: prompts left-padded to one width, completions right-padded after them,
    so every completion starts at the same column. Returns ``(input_ids, attention_mask, completion_mask,
    prompt_width)``; ``completion_mask`` is ``[B, C]`` over completion positions only."""
    width = max(len(p) for p in prompts)
    c_width = max(max((len(c) for c in completions), default=1), 1)
    b = len(prompts)
    ids = torch.full((b, width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width + c_width), dtype=torch.long)
    cmask = torch.zeros((b, c_width), dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[r, width - len(p) : width] = torch.as_tensor(list(p), dtype=torch.long)
        ids[r, width : width + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        attn[r, width - len(p) : width + len(c)] = 1
        cmask[r, : len(c)] = True
    if device is not None:
        ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
    return ids, attn, cmask, width


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def keeps_logits(model) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (the head then sees only the scored positions)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return _takes_logits_to_keep(type(base))


def last_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, with_entropy: bool = False,
               block_size: int = LOGITS_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, k]`` of the last ``k`` tokens of each row, and their entropies (detached; None without
    ``with_entropy``), from one forward. ``block_size`` tokens at a time through the head (0: full logits)."""
    k = min(k, input_ids.shape[1] - 1)
    kwargs = {"logits_to_keep": k + 1} if keeps_logits(model) else {}
    targets = input_ids[:, -k:]
    head, reason = split_head(model) if block_size > 0 else (None, None)
    if reason:
        warn_unchunked(reason)
    if head is not None:
        with head_input(head) as seen:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        if len(seen) == 1:
            return chunked_logps(seen[0][:, -(k + 1) : -1], head, targets, block_size, with_entropy)
        warn_unchunked(f"the model called its output head {len(seen)} times in one forward, not once")
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = out.logits[:, -(k + 1) : -1].float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    return logps, (token_entropy(logits, log_norm) if with_entropy else None)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                with_entropy: bool = False, block_size: int = LOGITS_BLOCK_SIZE):
    """Per-token log-probs ``[B, C]`` of the completion tokens of a :func:`pack` batch (and their per-token
    entropies, detached, when ``with_entropy``). Only the completion positions go through the lm head,
    ``block_size`` tokens at a time (0: all at once)."""
    logps, entropy = last_logps(model, input_ids, attention_mask, input_ids.shape[1] - prompt_width, with_entropy,
                                block_size)
    return (logps, entropy) if with_entropy else logps


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   block_size: int = LOGITS_BLOCK_SIZE):
    """:func:`completion_logps` of ``model``'s logits on a batch whose completions may start at different
    columns (``completion_mask [B, T]``): only the positions from the earliest completion token on go through
    the head, ``block_size`` tokens at a time (0: all at once)."""
    k = input_ids.shape[1] - int(completion_mask.float().argmax(-1).min())  # from the earliest completion token
    logps, entropy = last_logps(model, input_ids, attention_mask, k, True, block_size)
    mask = completion_mask[:, -logps.shape[1] :].to(logps.dtype)
    with torch.no_grad():
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
    return (logps * mask).sum(-1), mask.sum(-1), mean_entropy
