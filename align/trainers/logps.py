"""Per-sequence log-probs of completion tokens, from one forward pass."""

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
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = log_norm.detach() - (probs * logits.detach()).sum(-1)
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
    return logps, lengths, mean_entropy
