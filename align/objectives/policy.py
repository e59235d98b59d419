"""Token-level policy-gradient losses for the RL loop (GRPO and its variants, RAFT / RAFT++).

Pure functions over per-token log-prob tensors ``[B, T]`` with a completion mask; advantages are
per sequence ``[B]`` (see :mod:`align.objectives.advantages`).

* ``clip`` — PPO's clipped surrogate (Schulman et al. 2017) as GRPO uses it (Shao et al. 2024,
  arXiv:2402.03300): −min(ρ·Â, clip(ρ, 1−ε, 1+ε_high)·Â), ρ = exp(log π_θ − log π_old); ε_high is
  DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476). RAFT++ is this loss with 0/1 advantages.
* ``nll`` — −Â·log π_θ: plain RAFT (Dong et al. 2023, arXiv:2304.06767), SFT on accepted samples.
* optional k3 KL to a reference (``kl_estimator``, registry :data:`KL_ESTIMATORS`): ``k3`` adds
  β·k3 per token, k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (verl's ``low_var_kl``); ``k3_is``
  adds β·ρ·k3 with the unclipped ρ = π_θ / π_old (TRL 1.16's default, ``use_bias_correction_kl=True``). Same
  loss where ρ = 1, different gradients even there: per token β·(1 − π_ref/π_θ) against β·ρ·log(π_θ/π_ref)
  (docs/methods.md §11).
* optional per-token importance weights (``is_weights``) multiplying the token loss: truncated importance
  sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training")
  when another engine (vLLM) sampled the tokens, see :func:`truncated_is_weights`.

Aggregation (docs/methods.md §11, TRL's ``loss_type`` names) divides the masked token-loss sum by:
``grpo`` Σ_i(Σ_t ℓ_it / |o_i|) / B; ``bnpo`` the tokens of this batch; ``dapo`` the tokens of the whole
optimizer step's batch (``num_tokens``); ``dr_grpo`` B · ``max_completion_length``. ``num_sequences``
and ``num_tokens`` default to this batch's own counts; the trainer passes the counts of the whole
mini-batch (all micro-batches, all processes), so the gradient does not depend on how the mini-batch is
split. ``bnpo`` is local by definition and so does depend on the split.

Both are registries (:data:`TOKEN_LOSSES` by ``policy_loss`` name, :data:`AGGREGATIONS` by ``loss_type``), so a
new token loss or normaliser is one decorated function. What the trainer reads from an entry's ``info``:
``metrics`` (the keys a token loss reports) and ``per_micro_batch`` (an aggregation that is a mean per
micro-batch, ``bnpo``).
"""

from __future__ import annotations

import torch

from align.registry import Registry

TOKEN_LOSSES = Registry("policy_loss")
AGGREGATIONS = Registry("loss_type")
KL_ESTIMATORS = Registry("kl_estimator")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) (Schulman 2020), ≥ 0, as GRPO adds it to the loss."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


# --- KL estimators: fn(logps, ref_logps, old_logps | None) -> the per-token term that β multiplies [B, T] ---


@KL_ESTIMATORS.register("k3", "β·k3 per token (align's default; verl's low_var_kl without the clamp)")
def k3_term(logps, ref_logps, old_logps):
    return k3_kl(logps, ref_logps)


@KL_ESTIMATORS.register("k3_is", "β·ρ·k3 per token, ρ = π_θ/π_old (TRL's use_bias_correction_kl=True)")
def k3_is_term(logps, ref_logps, old_logps):
    old = logps.detach() if old_logps is None else old_logps
    return torch.exp(logps - old) * k3_kl(logps, ref_logps)


# --- token losses: fn(logps, adv [B, 1], old_logps | None, fmask, *, hyper) -> (token_loss [B, T], metrics) ---


@TOKEN_LOSSES.register("clip", "PPO / GRPO clipped surrogate (RAFT++ with 0/1 advantages)",
                       metrics=("clip_ratio/low", "clip_ratio/high", "clip_ratio/region"))
def clip_loss(logps, adv, old_logps, fmask, *, epsilon: float = 0.2, epsilon_high: float | None = None):
    eps_high = epsilon if epsilon_high is None else epsilon_high
    n_local = fmask.sum().clamp(min=1)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    token_loss = -torch.min(ratio * adv, clipped * adv)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(logps.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        metrics = {"clip_ratio/low": (low * fmask).sum() / n_local,
                   "clip_ratio/high": (high * fmask).sum() / n_local,
                   "clip_ratio/region": ((low + high) * fmask).sum() / n_local}
    return token_loss, metrics


@TOKEN_LOSSES.register("nll", "-Â·log π_θ (plain RAFT: SFT on accepted samples)")
def nll_loss(logps, adv, old_logps, fmask):
    return -adv * logps, {}


# --- aggregations: fn(masked token loss [B, T], mask, B, num_tokens | None, max_completion_length) -> scalar ---


@AGGREGATIONS.register("grpo", "each completion's token mean, summed over completions, / B")
def grpo_mean(total, mask, b, num_tokens, max_completion_length):
    return (total.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / b


@AGGREGATIONS.register("bnpo", "token mean over this micro-batch", per_micro_batch=True)
def bnpo_mean(total, mask, b, num_tokens, max_completion_length):
    return total.sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register("dapo", "token sum / the tokens of the whole optimizer step's batch")
def dapo_mean(total, mask, b, num_tokens, max_completion_length):
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return total.sum() / n


@AGGREGATIONS.register("dr_grpo", "token sum / (B · max_completion_length)")
def dr_grpo_mean(total, mask, b, num_tokens, max_completion_length):
    if not max_completion_length:
        raise ValueError("dr_grpo: max_completion_length is needed")
    return total.sum() / (b * max_completion_length)


LOSS_TYPES = AGGREGATIONS.names()
POLICY_LOSSES = TOKEN_LOSSES.names()
KL_ESTIMATOR_NAMES = KL_ESTIMATORS.names()


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *, num_sequences: float | None = None,
              num_tokens: float | None = None, max_completion_length: int | None = None) -> torch.Tensor:
    """The scalar loss of ``token_loss`` [B, T] under ``loss_type`` (normalisers as the module says)."""
    if loss_type not in AGGREGATIONS.entries:
        raise ValueError(f"loss_type: must be one of {AGGREGATIONS.names()}, got {loss_type!r}")
    mask = mask.to(token_loss.dtype)
    b = token_loss.shape[0] if num_sequences is None else num_sequences
    return AGGREGATIONS.entries[loss_type].fn(token_loss * mask, mask, b, num_tokens, max_completion_length)


def policy_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                policy: str = "clip", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                loss_type: str = "dapo", num_sequences: float | None = None, num_tokens: float | None = None,
                max_completion_length: int | None = None, is_weights: torch.Tensor | None = None,
                kl_estimator: str = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scalar loss, metrics) for one batch of completions.

    ``logps``/``old_logps``/``ref_logps``: per-token log-probs [B, T] of the completion tokens under the
    policy being trained, the policy that sampled them (default: ``logps`` detached, ratio 1) and the
    reference (needed when ``beta`` > 0). ``is_weights`` [B, T] (detached) multiply the policy term per token.
    ``kl_estimator`` (``k3`` or ``k3_is``) is the per-token KL term β multiplies; its token mean is the ``kl`` metric.
    ``mask`` [B, T] marks completion tokens that count (truncated
    completions already removed when ``mask_truncated_completions`` is on). Metrics are token means over
    this batch: ``clip_ratio/low`` (ρ < 1−ε with Â < 0), ``clip_ratio/high`` (ρ > 1+ε_high with Â > 0),
    ``clip_ratio/region`` (either) and ``kl``.
    """
    if policy not in TOKEN_LOSSES.entries:
        raise ValueError(f"policy: must be one of {TOKEN_LOSSES.names()}, got {policy!r}")
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    fmask = mask.to(logps.dtype)
    token_fn = TOKEN_LOSSES.bind(policy, epsilon=epsilon, epsilon_high=epsilon_high)
    token_loss, metrics = token_fn(logps, adv, old_logps, fmask)
    if is_weights is not None:
        token_loss = token_loss * is_weights.detach()
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = KL_ESTIMATORS.get(kl_estimator).fn(logps, ref_logps, old_logps)
        token_loss = token_loss + beta * kl
        metrics["kl"] = (kl.detach() * fmask).sum() / fmask.sum().clamp(min=1)
    loss = aggregate(token_loss, mask, loss_type, num_sequences=num_sequences, num_tokens=num_tokens,
                     max_completion_length=max_completion_length)
    return loss, metrics


def truncated_is_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                         cap: float | None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-token min(π_old / π_sampler, cap) (None when ``cap`` is None: no correction) and the sampler gap:
    ``rollout/logp_gap`` mean |log π_old − log π_sampler|, ``rollout/is_weight`` mean weight and
    ``rollout/is_clipped`` share of tokens whose ratio exceeds the cap, over ``mask``'s tokens."""
    fmask = mask.to(old_logps.dtype)
    n = fmask.sum().clamp(min=1)
    with torch.no_grad():
        diff = old_logps - sampler_logps
        ratio = torch.exp(diff)
        weights = ratio if cap is None else ratio.clamp(max=cap)
        clipped = (ratio > cap) if cap is not None else torch.zeros_like(fmask)
        metrics = {"rollout/logp_gap": (diff.abs() * fmask).sum() / n,
                   "rollout/is_weight": (weights * fmask).sum() / n,
                   "rollout/is_clipped": (clipped * fmask).sum() / n}
    return (None if cap is None else weights), metrics
