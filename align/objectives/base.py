"""The objective contract and registry.

An objective is a pure function over per-sequence log-prob tensors::

    fn(batch, *, beta=0.1, ...) -> ObjectiveOutput(losses=[B] tensor, metrics={name: scalar tensor})

``batch`` maps ``policy_chosen_logps``, ``policy_rejected_logps``, ``ref_chosen_logps``,
``ref_rejected_logps`` (log-probs summed over completion tokens, shape [B]) and ``chosen_lengths``,
``rejected_lengths`` (completion token counts, [B]) to tensors. Objectives register themselves with
:func:`register`; adding one is one module in this package plus its test, with no trainer edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from align.errors import ConfigError
from align.registry import Registry

Batch = Mapping[str, torch.Tensor]


@dataclass
class ObjectiveOutput:
    losses: torch.Tensor  # per example, [B]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, already averaged over the batch


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: Callable[..., ObjectiveOutput]
    summary: str
    paper: str
    params: dict[str, Any]  # hyperparameter -> default
    needs: tuple[str, ...] = ()  # extra batch entries the trainer must supply, e.g. "grad_norms"
    bounds: dict[str, str | tuple[str, ...]] = field(default_factory=dict)  # hyperparameter -> interval or choices


OBJECTIVES = Registry("objective", package="align.objectives")
# Every objective that takes β needs it positive: β <= 0 flips or removes the preference (β = -0.1 learns the
# reverse of every pair) and IPO divides by it. An objective's own ``bounds`` add to these.
COMMON_BOUNDS = {"beta": "(0, inf)"}


def register(name: str, summary: str, paper: str, needs: tuple[str, ...] = (),
             bounds: Mapping[str, str | tuple[str, ...]] | None = None):
    """Decorator: register ``fn(batch, *, hyper=default, ...)`` under ``name``. ``needs=("grad_norms",)``: the
    batch also carries ``chosen_grad_norms`` / ``rejected_grad_norms`` ([B], ‖∇ S_θ‖ over the trainer's
    ``entanglement_params`` subset; ones where no gradient exists, e.g. in evaluation). ``bounds``: the values a
    hyperparameter may take, an interval such as ``"[0, 0.5)"`` or a tuple of choices; :func:`check_params`
    enforces them (with :data:`COMMON_BOUNDS`) before any model loads, and every numeric value must be finite."""
    return OBJECTIVES.register(name, summary, paper=paper, needs=tuple(needs), bounds=dict(bounds or {}))


def registry() -> dict[str, ObjectiveSpec]:
    """Every objective, by name (imports each module of this package once)."""
    OBJECTIVES.load()
    return {name: ObjectiveSpec(e.name, e.fn, e.summary, e.info["paper"], e.params, e.info["needs"],
                                {**{k: v for k, v in COMMON_BOUNDS.items() if k in e.params}, **e.info["bounds"]})
            for name, e in sorted(OBJECTIVES.entries.items())}


def check_params(name: str, params: Mapping[str, Any]) -> ObjectiveSpec:
    """The objective's spec, after checking ``name`` exists, takes every key of ``params``, and each value is within
    the objective's bounds (one-line ConfigErrors naming the key)."""
    specs = registry()
    if name not in specs:
        raise ConfigError(f"objective: unknown objective {name!r} (known: {', '.join(specs)})")
    spec = specs[name]
    for key, value in params.items():
        if key not in spec.params:
            raise ConfigError(f"objective {name!r} does not take {key!r} (takes: {', '.join(spec.params)})")
        check_bound(name, key, value, spec.bounds.get(key))
    return spec


def check_bound(name: str, key: str, value: Any, bound: str | tuple[str, ...] | None) -> None:
    """One hyperparameter against its bound: choices (a tuple), or an interval ``"(0, inf)"`` / ``"[0, 0.5)"``
    that a finite real number must lie in; without a bound, a number must still be finite."""
    if isinstance(bound, tuple):
        if value not in bound:
            raise ConfigError(f"{key}: must be one of {bound}, got {value!r}")
        return
    number = isinstance(value, Real) and not isinstance(value, bool)
    if bound is None and not (number and not math.isfinite(value)):
        return
    if not number or not math.isfinite(value):
        raise ConfigError(f"{key}: objective {name!r} needs a finite number{f' in {bound}' if bound else ''}, "
                          f"got {value!r}")
    low, high = (float(x) for x in bound[1:-1].split(","))
    above = value > low if bound[0] == "(" else value >= low
    below = value < high if bound[-1] == ")" else value <= high
    if not (above and below):
        raise ConfigError(f"{key}: objective {name!r} needs {key} in {bound}, got {value}")


def build(name: str, **params) -> Callable[[Batch], ObjectiveOutput]:
    """``loss_fn = build("hdpo", beta=0.1, alpha=0.9)``; ``loss_fn(batch)`` gives an ObjectiveOutput."""
    spec = check_params(name, params)

    def loss_fn(batch: Batch) -> ObjectiveOutput:
        return spec.fn(batch, **params)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.spec = spec
    loss_fn.params = {**spec.params, **params}
    return loss_fn


# --- shared pieces --------------------------------------------------------------------------------


def log_ratios(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """h(y_w), h(y_l): policy minus reference summed log-probs of chosen and rejected."""
    return (
        batch["policy_chosen_logps"] - batch["ref_chosen_logps"],
        batch["policy_rejected_logps"] - batch["ref_rejected_logps"],
    )


def preference_metrics(batch: Batch, beta: float) -> dict[str, torch.Tensor]:
    """The metrics users know from TRL: implicit rewards β·h, their margin and accuracy, and logps."""
    h_w, h_l = log_ratios(batch)
    r_w, r_l = beta * h_w.detach(), beta * h_l.detach()
    return {
        "rewards/chosen": r_w.mean(),
        "rewards/rejected": r_l.mean(),
        "rewards/margins": (r_w - r_l).mean(),
        "rewards/accuracies": (r_w > r_l).float().mean(),
        "logps/chosen": batch["policy_chosen_logps"].detach().mean(),
        "logps/rejected": batch["policy_rejected_logps"].detach().mean(),
    }


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """−log σ(logits), computed stably."""
    return -F.logsigmoid(logits)
