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

logger = logging.getLogger(__name__)

# ``logits_block_size: auto`` (the config default): blocks of at most LOGITS_BLOCK_SIZE tokens whose logits hold at
# most AUTO_BLOCK_LOGITS values (128 MiB in fp32; a pass holds one block's logits at a time, docs/architecture.md):
# 220 tokens at Qwen2.5's 151,936-token vocabulary, 261 at Llama 3's 128,256, 512 at 65,536 or fewer. A pass that
# scores fewer positions is one block.
LOGITS_BLOCK_SIZE = 512
AUTO_BLOCK_LOGITS = 2**25


def block_tokens(block_size: int | str, vocab: int) -> int:
    """The tokens per block of a ``logits_block_size`` value for an output head of ``vocab`` tokens (0: off)."""
    if block_size == "auto":
        return max(1, min(LOGITS_BLOCK_SIZE, AUTO_BLOCK_LOGITS // vocab))
    return int(block_size)

# Config keys of models that transform the logits after the head (Gemma 2/3 softcapping, Cohere's logit_scale,
# Granite's logits_scaling, Falcon-H1's lm_head_multiplier): the head alone does not give their log-probs.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")

warned_reasons: set[str] = set()


def warn_unchunked(reason: str) -> None:
    """One warning per reason and process: the log-probs come from the full logits instead."""
    if reason not in warned_reasons:
        warned_reasons.add(reason)
        logger.warning("logits_block_size: %s; computing the full logits instead (unchunked)", reason)


# Wrappers whose ``.module`` is the model (FSDP's is kept: :func:`split_head` must see it).
WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def unwrap(model):
    """The model inside DDP / DataParallel / DeepSpeed / torch.compile wrappers (peft is kept: it is a model). By
    class name, not accelerate's ``extract_model_from_parallel``, which reads package metadata on every call (5 ms,
    three times a forward)."""
    while True:
        if type(model).__name__ in WRAPPERS:
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


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


# Rows of a block exponentiated at a time: with the block's logits, the one other [rows, vocab] temporary of a pass.
EXP_ROWS = 64


def block_forward(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """``(log_norm, target log-probs, entropies or None)`` of one block's fp32 ``logits [b, V]``, which it
    overwrites (shifted by their row maxima): ``logsumexp`` as torch computes it (max, then the sum of exponentials)
    and the entropy ``log Z - Σ e·(x - max) / Z``, exponentiating :data:`EXP_ROWS` rows at a time, so the block
    holds its logits and one small temporary, never a second [b, V] copy."""
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    top = logits.amax(-1)
    shifted = logits.sub_(top[:, None])
    z = torch.empty_like(top)
    weighted = torch.empty_like(top) if with_entropy else None
    for r in range(0, top.shape[0], EXP_ROWS):
        e = shifted[r : r + EXP_ROWS].exp()
        z[r : r + EXP_ROWS] = e.sum(-1)
        if with_entropy:
            weighted[r : r + EXP_ROWS] = e.mul_(shifted[r : r + EXP_ROWS]).sum(-1)
    log_z = z.log()
    norm = top + log_z
    return norm, target - norm, (log_z - weighted / z if with_entropy else None)


class ChunkedLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for each row ``i`` of ``hidden [N, H]``, computed
    ``block`` rows at a time: returns ``(logps [N] fp32, entropy [N] fp32 detached, or [0] without it)``.
    The backward recomputes each block's logits: ``d logp / d logits = g * (onehot(target) - softmax)``;
    blocks whose incoming gradient is all zero (padding, other sequences) are skipped. Each block's logits are
    worked on in place, and a block's tensors are freed before the next block's logits are made (peak: one
    block's logits and a small temporary)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, block: int, with_entropy: bool):
        n = hidden.shape[0]
        device = hidden.device.type  # the backward recomputes the logits under the same autocast as here
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        log_norm = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logps = torch.empty_like(log_norm)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, block):
            norm, logp, ent = block_forward(F.linear(hidden[s : s + block], weight, bias).float(),
                                            targets[s : s + block], with_entropy)
            log_norm[s : s + block], logps[s : s + block] = norm, logp
            if with_entropy:
                entropy[s : s + block] = ent
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
        for s in range(0, hidden.shape[0], block):
            g = grad_logps[s : s + block].float()
            if bool(g.any()):
                block_backward(ctx, g, hidden[s : s + block], weight, bias, targets[s : s + block],
                               log_norm[s : s + block], grad_weight, grad_bias,
                               grad_hidden[s : s + block] if need_hidden else None)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def block_backward(ctx, g, h, weight, bias, targets, log_norm, grad_weight, grad_bias, grad_hidden) -> None:
    """One block of :meth:`ChunkedLogps.backward`: recomputes its logits (under the forward's autocast) into
    ``grad_logits = g * (onehot(target) - softmax)`` in place, and adds to the fp32 ``grad_weight`` / ``grad_bias``
    accumulators and writes ``grad_hidden`` (each None when not needed)."""
    with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
        logits = F.linear(h, weight, bias).float()
    grad_logits = logits.sub_(log_norm[:, None]).exp_().mul_(-g[:, None])  # -g * softmax
    grad_logits.scatter_add_(-1, targets[:, None], g[:, None])  # + g * onehot(target)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
    dtype = torch.promote_types(h.dtype, weight.dtype)  # (they differ only under autocast)
    grad_logits = grad_logits.to(dtype)  # as the unchunked head's backward: in the matmul's dtype
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ weight.to(dtype))
    if grad_weight is not None:  # accumulated in place: no [vocab, hidden] temporary per block in fp32
        if dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), h.to(dtype))
        else:
            grad_weight += (grad_logits.t() @ h.to(dtype)).float()


def chunked_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, block_size: int,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[...]`` of ``targets [...]`` under ``head(hidden [..., H])``, ``block_size`` positions at a time
    (clamped to the number of positions), and their entropies (detached) when ``with_entropy``, else None."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    block = max(1, min(block_size, flat.shape[0]))
    logps, entropy = ChunkedLogps.apply(flat, head.weight, head.bias, targets.reshape(-1), block, with_entropy)
    return logps.view(shape), (entropy.view(shape) if with_entropy else None)
