"""The output head a block of tokens at a time: log-probs and entropies of chosen tokens without the full
``[tokens, vocab]`` logits.

:func:`split_head` finds the output projection of an HF causal LM (through DDP / accelerate wrappers and peft)
when it can be applied on its own, or says why not; :func:`head_input` captures what the model feeds it (the
final hidden states) while letting nothing through it; :class:`ChunkedLogps` then projects and log-softmaxes
``block_size`` positions at a time, and recomputes each block's logits in the backward pass, so peak memory
holds one block's logits (fp32), never the batch's. The values are those of the unchunked path: the same
matmul in the head's dtype, the same fp32 ``logsumexp`` / ``softmax``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from align.args import CPUSaneDefaults

logger = logging.getLogger(__name__)

# Tokens per block: the ``logits_block_size`` config default. At Qwen2.5's 151,936-token vocabulary one block's
# fp32 logits are 512 x 151,936 x 4 B = 0.31 GB; a pass peaks at ~3 of them (docs/architecture.md).
LOGITS_BLOCK_SIZE = CPUSaneDefaults.logits_block_size

# Config keys of models that transform the logits after the head (Gemma 2/3 softcapping, Cohere's logit_scale,
# Granite's logits_scaling, Falcon-H1's lm_head_multiplier): the head alone does not give their log-probs.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")

warned_reasons: set[str] = set()


def warn_unchunked(reason: str) -> None:
    """One warning per reason and process: the log-probs come from the full logits instead."""
    if reason not in warned_reasons:
        warned_reasons.add(reason)
        logger.warning("logits_block_size: %s; computing the full logits instead (unchunked)", reason)


def unwrap(model):
    """The model inside DDP / DataParallel / accelerate / torch.compile wrappers (peft is kept: it is a model)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


def split_head(model) -> tuple[torch.nn.Linear | None, str | None]:
    """``(head, None)`` when the output head of ``model`` is a plain ``nn.Linear`` whose output is the logits,
    else ``(None, reason)``."""
    base = unwrap(model)
    if any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in (model, base)):
        return None, "the model is wrapped by FSDP (its weights are sharded)"
    config = getattr(base, "config", None)
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in ((None,) if "softcap" in key else (None, 1)):  # a scale of 1 changes nothing
            return None, f"the model's config sets {key}={value!r} (a transform of the logits after the head)"
    if not hasattr(base, "get_output_embeddings"):
        return None, f"{type(base).__name__} has no get_output_embeddings()"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None, f"the output head is a {type(head).__module__}.{type(head).__name__}, not a torch.nn.Linear"
    weight = head.weight
    if (type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id")
            or tuple(weight.shape) != (head.out_features, head.in_features)):
        return None, "the output head's weight is sharded (FSDP / DeepSpeed ZeRO-3 / tensor parallel)"
    return head, None


@contextlib.contextmanager
def head_input(head: torch.nn.Module):
    """While open, every call of ``head`` appends its input (the hidden states, ``[..., T, H]``) to the yielded
    list and gets an empty slice of it instead (``[..., 0, H]``), so the model's own logits are empty."""
    seen: list[torch.Tensor] = []

    def swap(module, args, kwargs):
        hidden = args[0] if args else kwargs["input"]
        seen.append(hidden)
        empty = hidden[..., :0, :]
        return ((empty, *args[1:]), kwargs) if args else (args, {**kwargs, "input": empty})

    handle = head.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


class ChunkedLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for each row ``i`` of ``hidden [N, H]``, computed
    ``block`` rows at a time: returns ``(logps [N] fp32, entropy [N] fp32 detached, or [0] without it)``.
    The backward recomputes each block's logits: ``d logp / d logits = g * (onehot(target) - softmax)``;
    blocks whose incoming gradient is all zero (padding, other sequences) are skipped."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, block: int, with_entropy: bool):
        n = hidden.shape[0]
        device = hidden.device.type  # the backward recomputes the logits under the same autocast as here
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        log_norm = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logps = torch.empty_like(log_norm)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, block):
            logits = F.linear(hidden[s : s + block], weight, bias).float()
            norm = torch.logsumexp(logits, dim=-1)
            log_norm[s : s + block] = norm
            logps[s : s + block] = logits.gather(-1, targets[s : s + block, None]).squeeze(-1) - norm
            if with_entropy:
                entropy[s : s + block] = norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.block = block
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        block = ctx.block
        dtype = torch.promote_types(hidden.dtype, weight.dtype)  # (they differ only under autocast)
        for s in range(0, hidden.shape[0], block):
            g = grad_logps[s : s + block].float()
            if not bool(g.any()):
                continue
            h = hidden[s : s + block]
            with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
                logits = F.linear(h, weight, bias).float()
            grad_logits = logits.sub_(log_norm[s : s + block, None]).exp_().mul_(-g[:, None])  # -g * softmax
            grad_logits.scatter_add_(-1, targets[s : s + block, None], g[:, None])  # + g * onehot(target)
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(dtype)  # as the unchunked head's backward: in the matmul's dtype
            if need_hidden:
                grad_hidden[s : s + block] = grad_logits @ weight.to(dtype)
            if need_weight:
                grad_weight += (grad_logits.t() @ h.to(dtype)).float()
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, block_size: int,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[...]`` of ``targets [...]`` under ``head(hidden [..., H])``, ``block_size`` positions at a time
    (clamped to the number of positions), and their entropies (detached) when ``with_entropy``, else None."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    block = max(1, min(block_size, flat.shape[0]))
    logps, entropy = ChunkedLogps.apply(flat, head.weight, head.bias, targets.reshape(-1), block, with_entropy)
    return logps.view(shape), (entropy.view(shape) if with_entropy else None)
