"""GVM sample allocation (RLHFlow/GVM; docs/methods.md §13): how many rollouts each prompt gets from a budget N.

Chain-of-thought training as EM: prompt i is accepted (verified) with rate p_i and has gradient scale G_i;
with n_i samples its share of the gradient-estimator variance is about G_i² / (n_i·p_i). Minimising the sum
under Σ n_i = N gives n_i ∝ G_i/√p_i; GVM regularises the denominator (α, β) so that tiny or badly
estimated p_i do not absorb the budget. §13.2 (``em/stage_2_calc_sample_size.py``) is, per prompt:

    w_i = 0                                   if p_i == 0 or G_i == 0
    w_i = G_i / sqrt(p_i + α / p_i^(β−1))     otherwise
    w̃ = w / Σw;  optional filters zero some w̃_i;  w̃ ← w̃ / Σw̃
    n_i = round_preserving_sum(N·w̃, N)

:func:`gvm_allocate` with ``min_n=0`` and ``max_n=None`` is exactly that rule; ``min_n`` / ``max_n`` add the
per-prompt bounds that §13.6 recommends (the legacy offline GVM path caps at 24).
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Sequence

__all__ = ["gvm_allocate", "gvm_weights", "round_preserving_sum", "uniform_allocate"]


def _as_count(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}") from None
    if out < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {out}")
    return out


def _round_to_total(
    values: Sequence[float], total: int, lower: Sequence[int], upper: Sequence[int | None]
) -> list[int]:
    """Round ``values`` to integers in ``[lower_i, upper_i]`` (``None``: unbounded) summing to ``total``.

    The caller guarantees feasibility (Σ lower ≤ total ≤ Σ upper). See :func:`round_preserving_sum` for the rule.
    """
    m = len(values)
    n = [int(math.floor(v + 0.5)) for v in values]  # nearest, halves up
    for i in range(m):
        if n[i] < lower[i]:
            n[i] = lower[i]
        elif upper[i] is not None and n[i] > upper[i]:
            n[i] = upper[i]
    diff = total - sum(n)
    if diff > 0:
        if m and all(u is None for u in upper) and diff >= m:
            # Adding q to every entry lowers every residual by q: the order (and so the result) is unchanged.
            q = diff // m
            n = [k + q for k in n]
            diff -= q * m
        # Largest residual (value − rounded) first; at equal residuals the lower index first.
        heap = [(n[i] - values[i], i) for i in range(m) if upper[i] is None or n[i] < upper[i]]
        heapq.heapify(heap)
        while diff > 0:
            if not heap:
                raise ValueError(f"total: {total} is above the sum of the upper bounds")
            _, i = heapq.heappop(heap)
            n[i] += 1
            diff -= 1
            if upper[i] is None or n[i] < upper[i]:
                heapq.heappush(heap, (n[i] - values[i], i))
    elif diff < 0:
        # Smallest residual first; at equal residuals the higher index gives up its unit, so that the lower
        # index keeps it (the same tie rule as for additions).
        heap = [(values[i] - n[i], -i) for i in range(m) if n[i] > lower[i]]
        heapq.heapify(heap)
        while diff < 0:
            if not heap:
                raise ValueError(f"total: {total} is below the sum of the lower bounds")
            _, neg = heapq.heappop(heap)
            i = -neg
            n[i] -= 1
            diff += 1
            if n[i] > lower[i]:
                heapq.heappush(heap, (values[i] - n[i], -i))
    return n


def round_preserving_sum(values: Sequence[float], total: int) -> list[int]:
    """Largest-remainder rounding of non-negative ``values`` to non-negative integers that sum to ``total``.

    Each value is first rounded to the nearest integer (halves up). While the sum is below ``total``, 1 is added
    to the entry with the largest residual (value − current integer); while it is above, 1 is removed from the
    entry with the smallest residual among those still positive, so no entry goes negative. Residuals are
    recomputed after every change, so an entry is adjusted a second time only after every other entry has been.

    Ties are deterministic and favour the lower index: on additions the lower index gets the unit first, on
    removals the higher index loses it first. So when ``total == sum(values)`` the result is the classical
    Hamilton apportionment (floor, then +1 for the largest fractional parts, lower index first), e.g.
    ``[1.5, 1.5, 1.0]`` with total 4 gives ``[2, 1, 1]``. (GVM's numpy code leaves exact ties to ``argsort``.)

    Raises ``ValueError`` for a negative, NaN or infinite value, a negative ``total``, or an empty ``values``
    with ``total > 0``.
    """
    total = _as_count(total, "total")
    vals = [float(v) for v in values]
    for v in vals:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"values: every value must be finite and >= 0, got {v}")
    if not vals:
        if total:
            raise ValueError(f"values: empty, cannot sum to total={total}")
        return []
    return _round_to_total(vals, total, [0] * len(vals), [None] * len(vals))


def uniform_allocate(num_prompts: int, n: int) -> list[int]:
    """The baseline allocation: ``n`` samples for each of ``num_prompts`` prompts."""
    return [_as_count(n, "n")] * _as_count(num_prompts, "num_prompts")


def _check_rates(accept_rates, grad_norms) -> tuple[list[float], list[float]]:
    p = [float(x) for x in accept_rates]
    g = [float(x) for x in grad_norms]
    if len(p) != len(g):
        raise ValueError(f"accept_rates and grad_norms: lengths differ ({len(p)} vs {len(g)})")
    for x in p:
        if math.isnan(x) or not 0.0 <= x <= 1.0:
            raise ValueError(f"accept_rates: every rate must be in [0, 1], got {x}")
    for x in g:
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"grad_norms: every norm must be finite and >= 0, got {x}")
    return p, g


def _check_hparams(alpha: float, beta: float) -> None:
    if math.isnan(alpha) or alpha < 0 or math.isinf(alpha):
        raise ValueError(f"alpha: must be finite and >= 0, got {alpha}")
    if not math.isfinite(beta):
        raise ValueError(f"beta: must be finite, got {beta}")


def _weights(p: list[float], g: list[float], alpha: float, beta: float) -> list[float]:
    return [0.0 if pi == 0 or gi == 0 else gi / math.sqrt(pi + alpha / pi ** (beta - 1.0)) for pi, gi in zip(p, g)]


def gvm_weights(
    accept_rates: Sequence[float], grad_norms: Sequence[float], alpha: float = 1e-3, beta: float = 2.0
) -> list[float]:
    """Unnormalised GVM weights: ``w_i = 0`` if ``p_i == 0`` or ``G_i == 0``, else ``G_i / sqrt(p_i + α/p_i^(β−1))``.

    For β = 2 the denominator is ``sqrt(p + α/p)``; w peaks at p* = (α(β−1))^(1/β) (√α for β = 2) and goes to 0
    as p → 0. Raises ``ValueError`` on mismatched lengths, p outside [0, 1], negative/NaN G, or α < 0.
    """
    p, g = _check_rates(accept_rates, grad_norms)
    _check_hparams(alpha, beta)
    return _weights(p, g, alpha, beta)


def gvm_allocate(
    accept_rates: Sequence[float],
    grad_norms: Sequence[float],
    budget: int,
    alpha: float = 1e-3,
    beta: float = 2.0,
    filter_threshold: float = 1.0,
    filter_insufficient: float = 0.0,
    min_n: int = 0,
    max_n: int | None = None,
) -> list[int]:
    """Per-prompt sample counts ``n_i`` for a budget ``N`` (docs/methods.md §13.2), optionally bounded.

    1. ratios ``w̃ = w / Σw`` with :func:`gvm_weights`;
    2. if ``0 < filter_threshold``: ``w̃_i = 0`` where ``p_i > filter_threshold`` (drop easy prompts; since p ≤ 1
       the default 1.0 is off, and a threshold ≤ 0 is off as in GVM's code);
    3. if ``filter_insufficient > 0``: ``w̃_i = 0`` where ``p_i · w̃_i · N < filter_insufficient`` (expected number
       of accepted samples too small; uses the ratios after step 2, before renormalising, as GVM does);
    4. renormalise, and ``n = round_preserving_sum(N · w̃, N)``.

    With ``min_n = 0`` and ``max_n = None`` that is the whole rule. Otherwise every prompt (zero-weight ones too)
    first gets ``min_n``, and the remaining ``N − m·min_n`` is spread over the positive-weight prompts in
    proportion to ``w̃`` with each total capped at ``max_n`` (water-filling: a prompt whose share would exceed the
    cap is fixed at the cap and the rest is renormalised over the others); the shares are then rounded with the
    same largest-remainder rule, inside the bounds, to an exact sum of N.

    The sum is below N only when the cap makes N unreachable: then every positive-weight prompt gets ``max_n``
    and every other prompt ``min_n``. If every weight is zero (all p_i = 0 or G_i = 0, or all filtered), every
    prompt gets ``min_n`` (all zeros by default): the caller decides whether to skip the batch, as GVM does.

    Raises ``ValueError`` (naming the argument) on mismatched lengths, p outside [0, 1], negative/NaN G,
    α < 0, a negative budget, ``min_n < 0``, ``max_n < min_n``, or ``budget < min_n · len(accept_rates)``.
    """
    p, g = _check_rates(accept_rates, grad_norms)
    _check_hparams(alpha, beta)
    budget = _as_count(budget, "budget")
    min_n = _as_count(min_n, "min_n")
    if max_n is not None:
        max_n = _as_count(max_n, "max_n")
        if max_n < min_n:
            raise ValueError(f"max_n: must be >= min_n={min_n}, got {max_n}")
    if math.isnan(filter_threshold):
        raise ValueError("filter_threshold: must be a number, got nan")
    if math.isnan(filter_insufficient):
        raise ValueError("filter_insufficient: must be a number, got nan")
    m = len(p)
    if budget < m * min_n:
        raise ValueError(f"budget: budget N={budget} is smaller than min_n*prompts={m * min_n}")

    w = _weights(p, g, alpha, beta)
    total_w = sum(w)
    if total_w <= 0:
        return [min_n] * m
    ratio = [x / total_w for x in w]
    if filter_threshold > 0:
        ratio = [0.0 if pi > filter_threshold else r for pi, r in zip(p, ratio)]
    if filter_insufficient > 0:
        ratio = [0.0 if pi * r * budget < filter_insufficient else r for pi, r in zip(p, ratio)]
    total_r = sum(ratio)
    if total_r <= 0:
        return [min_n] * m
    ratio = [r / total_r for r in ratio]

    if min_n == 0 and max_n is None:
        return round_preserving_sum([budget * r for r in ratio], budget)

    active = [i for i in range(m) if ratio[i] > 0]
    rest = budget - m * min_n
    cap = None if max_n is None else max_n - min_n  # cap on the extra samples above min_n
    extra = [0.0] * m
    if cap is None:
        for i in active:
            extra[i] = rest * ratio[i]
        target = rest
    else:
        target = min(rest, cap * len(active))
        free, remaining, first = list(active), float(rest), True
        while free:
            mass = 1.0 if first else sum(ratio[i] for i in free)
            share = {i: remaining * ratio[i] / mass for i in free}
            over = [i for i in free if share[i] > cap]
            if not over:
                for i in free:
                    extra[i] = share[i]
                break
            for i in over:
                extra[i] = float(cap)
            remaining -= cap * len(over)
            free = [i for i in free if share[i] <= cap]
            first = False
    positive = set(active)
    upper = [(cap if i in positive else 0) for i in range(m)]
    rounded = _round_to_total(extra, target, [0] * m, upper)
    return [min_n + k for k in rounded]
