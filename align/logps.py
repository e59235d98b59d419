"""Log-probs and entropies of tokens: the one place they are computed from logits (training losses, monitors,
evaluation)."""

from __future__ import annotations

import torch


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


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                with_entropy: bool = False):
    """Per-token log-probs ``[B, C]`` of the completion tokens of a :func:`pack` batch (and their per-token
    entropies, detached, when ``with_entropy``). Only the completion positions go through the lm head."""
    c = input_ids.shape[1] - prompt_width
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=c + 1)
    logits = out.logits[:, -(c + 1) : -1].float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, input_ids[:, prompt_width:].unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logps
    return logps, token_entropy(logits, log_norm)
