"""Micro-batches by a token budget, grouped by length: the no-gradient log-prob passes (the DPO-family reference
precompute, the RL old / reference log-probs) run their forwards on these.

An item is what one pass scores together: an RL sample (one sequence: a left-padded prompt and a right-padded
completion, :func:`align.logps.pack`) or a preference pair (two sequences, chosen and rejected, right-padded to
one width, :class:`align.data.preference.PreferenceCollator`). ``sizes[i]`` holds item ``i``'s lengths per padded
segment: ``(prompt, completion)`` for an RL sample, ``(longest sequence,)`` for a pair. A micro-batch's padded
width is the sum over segments of the longest; its padded size is ``rows x width``, with ``rows`` = items x
``rows_per_item``. :func:`token_budget_batches` sorts the items longest first (ties keep their order) and closes a
micro-batch when the next item would take its padded size over ``budget`` (or its items over ``max_items``,
when given); a micro-batch has at least one item, so an item longer than the budget runs alone. Callers write
each result back by item index, so the order of the results is the items' own. The RL update groups its
micro-batches in the same order (:func:`longest_first`).
"""

from __future__ import annotations

from collections.abc import Sequence

Sizes = Sequence[Sequence[int]]


def padded_width(sizes: Sizes, batch: Sequence[int]) -> int:
    """The padded width of the items ``batch`` (indices into ``sizes``): per segment the longest, summed."""
    return sum(max(sizes[i][seg] for i in batch) for seg in range(len(sizes[batch[0]])))


def longest_first(sizes: Sizes) -> list[int]:
    """Item indices by total length, longest first; ties keep their order (the one grouping order of every pass)."""
    return sorted(range(len(sizes)), key=lambda i: -sum(sizes[i]))


def token_budget_batches(sizes: Sizes, budget: int, rows_per_item: int = 1,
                         max_items: int | None = None) -> list[list[int]]:
    """Item indices in micro-batches of padded size ``rows x width <= budget`` (one item at least) and at most
    ``max_items`` items, longest items first (see the module docstring)."""
    if budget < 1:
        raise ValueError(f"budget: must be >= 1, got {budget}")
    batches: list[list[int]] = []
    current: list[int] = []
    widest: list[int] = []  # per segment, the longest in ``current``
    for i in longest_first(sizes):
        grown = [max(w, n) for w, n in zip(widest, sizes[i], strict=True)] if current else list(sizes[i])
        full = max_items is not None and len(current) >= max_items
        if current and (full or (len(current) + 1) * rows_per_item * sum(grown) > budget):
            batches.append(current)
            current, grown = [], list(sizes[i])
        current.append(i)
        widest = grown
    if current:
        batches.append(current)
    return batches


def padding_fraction(sizes: Sizes, batches: Sequence[Sequence[int]], real_tokens: int, rows_per_item: int = 1) -> float:
    """The share of the padded tensors' positions that are padding, over all ``batches`` (``real_tokens``: the
    items' own tokens, which the caller counts: a pair's two sequences differ in length)."""
    padded = sum(len(b) * rows_per_item * padded_width(sizes, b) for b in batches)
    return 1.0 - real_tokens / padded if padded else 0.0
