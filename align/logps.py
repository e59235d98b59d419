"""Log-probs and entropies of tokens: the one place they are computed (training losses, reference and old
log-probs, monitors, evaluation).

From a model (:func:`token_logps`, :func:`sequence_logps`) the scored positions' hidden states go through the
output head ``block_size`` tokens at a time (:mod:`align.lm_head`), never as full ``[batch, tokens, vocab]``
logits; ``block_size=0``, or a head that cannot be split (one warning), computes the full logits as before. With
``padding_free`` the batch's padding is dropped before the forward (:class:`Packed`): the sequences go one after
another into one row (flash-attention) or into rows as wide as the longest (sdpa / eager / flex), with
``position_ids`` restarting at 0 for each and no attention mask, so the attention implementation keeps them apart
(a block-diagonal causal mask, or flash-attention's variable-length kernel); the log-probs come back in the padded
layout, 0 at the positions that are not scored.
"""

from __future__ import annotations

import functools

import torch

from align.checks import PACKED_ATTENTION, packed_attention
from align.errors import ConfigError
from align.lm_head import (
    block_tokens,
    chunked_logps,
    head_input,
    split_head,
    unwrap,
    warn_unchunked,
)


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


def scoring(args) -> dict:
    """The run's log-prob options, as keyword arguments of :func:`token_logps` / :func:`sequence_logps`: every
    trainer's pass reads them from its config here (``logits_block_size``, ``padding_free``)."""
    return {"block_size": args.logits_block_size, "padding_free": bool(getattr(args, "padding_free", False))}


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def keeps_logits(model) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (the head then sees only the scored positions)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return _takes_logits_to_keep(type(base))


# Attention implementations that take packed sequences in one row only (flash-attention's variable-length kernel,
# which transformers uses for a batch of one row); the others get rows of the longest sequence's width.
ONE_ROW = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def check_packable(model) -> str:
    """The attention implementation ``model`` runs, which ``padding_free`` needs to keep packed sequences apart
    (one line if it cannot)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if packed_attention(impl) not in PACKED_ATTENTION:
        raise ConfigError(f"padding_free: the model's attention implementation {impl!r} cannot keep packed sequences "
                          f"apart (supported: {', '.join(PACKED_ATTENTION)}); set attn_implementation to one of them, "
                          "or padding_free=false")
    return packed_attention(impl)


class Scored:
    """The positions of a padded batch's last ``k`` columns that are scored: a target whose token and preceding token
    are both real (only these go through the output head). ``mask`` ``[B, k]`` bool; ``targets`` ``[M]`` (row-major
    order)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int):
        real, t = attention_mask.bool(), input_ids.shape[1]
        self.mask = real[:, t - k :] & real[:, t - k - 1 : t - 1]
        self.targets = input_ids[:, t - k :][self.mask]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """``[M]`` values of the scored positions -> ``[B, k]`` (0 elsewhere; differentiable)."""
        return torch.zeros(self.mask.shape, dtype=values.dtype, device=values.device).masked_scatter(self.mask, values)


class Packed:
    """A padded batch ``[B, T]`` (each row's tokens contiguous: left or right padding) without its padding: the
    sequences one after another in ``rows`` rows of ``width`` tokens, ``position_ids`` restarting at 0 for each.
    ``one_row``: a single row of every real token (flash-attention's variable-length kernel takes only that);
    otherwise rows as wide as the longest sequence, filled longest first (first fit), so that an sdpa / eager
    attention over a row costs no more than over a padded row; a row's unfilled tail continues its last sequence's
    positions (causal attention keeps that sequence's tokens from seeing it) and is never scored.

    ``scored``: the :class:`Scored` positions of the last ``k`` columns; ``source`` ``[M]``, the flat packed position
    of the hidden state predicting each scored target."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, one_row: bool = True):
        b, t = input_ids.shape
        device = input_ids.device
        real = attention_mask.bool()
        lengths = real.sum(-1).tolist()
        starts = real.long().argmax(-1).tolist()
        self.width = sum(lengths) if one_row else max(lengths)
        fill: list[int] = []  # tokens placed in each packed row
        where = torch.full((b * t,), -1, dtype=torch.long, device=device)  # padded flat index -> packed flat index
        for i in range(b) if one_row else sorted(range(b), key=lambda i: -lengths[i]):
            row = next((r for r, used in enumerate(fill) if used + lengths[i] <= self.width), len(fill))
            if row == len(fill):
                fill.append(0)
            first = row * self.width + fill[row]
            where[i * t + starts[i] : i * t + starts[i] + lengths[i]] = torch.arange(first, first + lengths[i],
                                                                                      device=device)
            fill[row] += lengths[i]
        self.rows = len(fill)
        kept = where >= 0
        flat_ids = torch.zeros(self.rows * self.width, dtype=input_ids.dtype, device=device)
        flat_ids[where[kept]] = input_ids.reshape(-1)[kept]
        positions = torch.full((self.rows * self.width,), -1, dtype=torch.long, device=device)
        positions[where[kept]] = (real.long().cumsum(-1) - 1).reshape(-1)[kept]
        positions = positions.view(self.rows, self.width)
        # the unfilled tail of a row continues the positions of the row's last sequence: column - its first column
        column = torch.arange(self.width, device=device).expand(self.rows, -1)
        last_start = torch.where(positions == 0, column, torch.zeros_like(column)).cummax(-1).values
        self.position_ids = torch.where(positions >= 0, positions, column - last_start)
        self.ids = flat_ids.view(self.rows, self.width)
        self.scored = Scored(input_ids, attention_mask, k)
        rows, cols = self.scored.mask.nonzero(as_tuple=True)
        self.source = where[rows * t + (t - k - 1) + cols]
        self.padded_tokens, self.tokens = b * t, sum(lengths)


def last_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, with_entropy: bool = False,
               block_size: int | str = "auto", padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, k]`` of the last ``k`` tokens of each row, and their entropies (detached; None without
    ``with_entropy``), from one forward. ``block_size`` tokens at a time through the head (0: full logits; auto:
    :func:`~align.lm_head.block_tokens`). Only the :class:`Scored` positions go through the head: a position whose
    target or preceding token is padding gets 0. ``padding_free``: the forward runs on the packed real tokens
    (:class:`Packed`: one row with flash-attention, rows of the longest sequence's width otherwise)."""
    k = min(k, input_ids.shape[1] - 1)
    packed = None
    if padding_free:
        one_row = check_packable(model) in ONE_ROW
        packed = Packed(input_ids, attention_mask, k, one_row)
        inputs = {"input_ids": packed.ids, "position_ids": packed.position_ids, "attention_mask": None}
        keep = packed.source if packed.rows == 1 else None  # logits_to_keep indexes the columns of every row
        positions = packed.scored
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        keep = k + 1
        positions = Scored(input_ids, attention_mask, k)
    kwargs = {"logits_to_keep": keep} if keep is not None and keeps_logits(model) else {}
    targets = positions.targets

    def scored(x: torch.Tensor) -> torch.Tensor:
        """The rows ``[M, ...]`` of the head's input / output ``x`` that predict the targets."""
        if packed is None:
            return x[:, -(k + 1) : -1][positions.mask]
        return x[0] if kwargs else x.reshape(-1, x.shape[-1])[packed.source]

    def result(logps, entropy):
        return positions.unpack(logps), (positions.unpack(entropy) if entropy is not None else None)

    head, reason = split_head(model) if block_size != 0 else (None, None)
    if reason:
        warn_unchunked(reason)
    if head is not None:
        with head_input(head) as seen:
            model(**inputs, use_cache=False, **kwargs)
        if len(seen) == 1:
            block = block_tokens(block_size, head.out_features)
            return result(*chunked_logps(scored(seen[0]), head, targets, block, with_entropy))
        warn_unchunked(f"the model called its output head {len(seen)} times in one forward, not once")
    logits = scored(model(**inputs, use_cache=False, **kwargs).logits).float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    return result(logps, token_entropy(logits, log_norm) if with_entropy else None)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                with_entropy: bool = False, block_size: int | str = "auto", padding_free: bool = False):
    """Per-token log-probs ``[B, C]`` of the completion tokens of a :func:`pack` batch (and their per-token
    entropies, detached, when ``with_entropy``). Only the completion positions go through the lm head,
    ``block_size`` tokens at a time (0: all at once); ``padding_free``: see :func:`last_logps`."""
    logps, entropy = last_logps(model, input_ids, attention_mask, input_ids.shape[1] - prompt_width, with_entropy,
                                block_size, padding_free)
    return (logps, entropy) if with_entropy else logps


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   block_size: int | str = "auto", padding_free: bool = False):
    """:func:`completion_logps` of ``model``'s logits on a batch whose completions may start at different
    columns (``completion_mask [B, T]``): only the positions from the earliest completion token on go through
    the head, ``block_size`` tokens at a time (0: all at once); ``padding_free``: see :func:`last_logps`."""
    k = input_ids.shape[1] - int(completion_mask.float().argmax(-1).min())  # from the earliest completion token
    logps, entropy = last_logps(model, input_ids, attention_mask, k, True, block_size, padding_free)
    mask = completion_mask[:, -logps.shape[1] :].to(logps.dtype)
    with torch.no_grad():
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
    return (logps * mask).sum(-1), mask.sum(-1), mean_entropy
