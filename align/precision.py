"""fp32 master weights: ``torch_dtype: bfloat16`` (or ``float16``) is the dtype a run computes in, not the dtype of
the weights it trains.

With bf16 weights every optimizer update is rounded to bf16, whose 8 significant bits space representable values
``2^-8`` to ``2^-7`` of a weight apart: an Adam step (about ``learning_rate`` per weight) smaller than half that
spacing rounds away. On the testbed at lr 5e-7, 4 steps changed 0.81% of the weights in bf16 and 96.4% in fp32.
So by default the weights load in float32 and the forward runs in the half dtype under autocast (``bf16: true`` /
``fp16: true``; FSDP's mixed precision under FSDP); ``pure_bf16: true`` keeps the weights (and Adam's updates) in the
half dtype, for memory. LoRA runs keep the frozen base in the half dtype (nothing to update there).
:func:`warn_vanishing_updates` says when the learning rate is too small for half-precision
weights, by the rule of :func:`vanishing_threshold`.
"""

from __future__ import annotations

import sys

from align.errors import ConfigError

HALF = {"bfloat16": "bf16", "float16": "fp16"}  # torch_dtype -> the training argument that autocasts to it
# Significant bits of each half dtype (the stored mantissa + the implicit leading one).
SIGNIFICANT_BITS = {"bfloat16": 8, "float16": 11}


def apply_master_weights(values: dict) -> None:
    """On the raw config ``values`` (before transformers sees them): a half ``torch_dtype`` without ``pure_bf16``
    turns on its autocast flag (``bf16`` / ``fp16``); an explicit ``false`` there, or ``pure_bf16`` without a half
    dtype to keep, is a one-line ConfigError."""
    dtype, pure = values.get("torch_dtype"), values.get("pure_bf16", False)
    if pure and dtype not in (*HALF, "auto"):
        raise ConfigError(f"pure_bf16: keeps the weights in torch_dtype, which is {dtype or 'float32'!r}; set "
                          "torch_dtype: bfloat16 (or float16, auto), or remove pure_bf16")
    if dtype not in HALF or pure:
        return
    flag = HALF[dtype]
    if values.get(flag) is False:
        raise ConfigError(f"{flag}: false, but torch_dtype: {dtype} computes in {dtype} through {flag} autocast over "
                          f"float32 master weights; remove {flag}: false, use torch_dtype: float32, or pure_bf16: true "
                          f"for {dtype} weights")
    values[flag] = True


def weights_dtype(config) -> str:
    """The dtype the weights load in: float32 for a half ``torch_dtype`` unless ``pure_bf16`` or LoRA (``use_peft``:
    the base weights never change, and peft keeps the adapter in float32), else ``torch_dtype``."""
    dtype = config.torch_dtype
    keep = getattr(config, "pure_bf16", False) or getattr(config, "use_peft", False)
    return "float32" if dtype in HALF and not keep else dtype


def compute_dtype(config) -> str | None:
    """The dtype the forwards run in when ``torch_dtype`` is a half dtype (what a vLLM engine should hold the weights
    in, whatever the master weights are); None otherwise (an engine then takes the policy's weights' dtype)."""
    dtype = getattr(config, "torch_dtype", None)
    return dtype if dtype in HALF else None


def vanishing_threshold(dtype_name: str, typical_weight: float) -> float:
    """The rule: a learning rate below ``2^-(significant bits)`` x the weights' typical magnitude (their median
    ``|w|``) is below the dtype's relative precision at a typical weight, so most Adam steps (about lr each) round
    away: ``2^-8 x median|w|`` for bfloat16, ``2^-11 x median|w|`` for float16."""
    return typical_weight * 2.0 ** -SIGNIFICANT_BITS[dtype_name]


def typical_weight(model, per_tensor: int = 4096) -> float:
    """The median ``|w|`` over the model's weight matrices (2-D and up), from at most ``per_tensor`` evenly spaced
    entries of each (a 7B model is not read whole)."""
    import torch

    samples = []
    for p in model.parameters():
        if p.dim() < 2 or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        samples.append(flat[::step][:per_tensor].float().abs().cpu())
    return float(torch.cat(samples).median()) if samples else 0.0


def warn_vanishing_updates(model, config, is_main: bool = True) -> str | None:
    """The warning (printed once, main process) when ``model``'s trainable weights are half precision and
    ``learning_rate`` is below :func:`vanishing_threshold`; returns it, or None. LoRA adapters are not checked (peft
    keeps them in float32)."""
    import torch

    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    half = [names[d] for d in dtypes if d in names]
    lr = getattr(config, "learning_rate", None)
    if not half or getattr(config, "use_peft", False) or lr is None:
        return None
    scale = typical_weight(model)
    limit = vanishing_threshold(half[0], scale)
    if lr >= limit:
        return None
    bits = SIGNIFICANT_BITS[half[0]]
    line = (f"warning: learning_rate {lr:g} is below {half[0]}'s relative precision 2^-{bits} x the weights' median "
            f"|w| {scale:.3g} = {limit:.3g}: most updates of {half[0]} weights round away (docs/architecture.md, "
            f"Precision); leave pure_bf16 off (float32 master weights, {half[0]} compute) or raise learning_rate")
    if is_main:
        print(line, file=sys.stderr, flush=True)
    return line
