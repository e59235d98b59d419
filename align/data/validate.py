"""Checks on dataset rows, run before any model is loaded; errors name the split, row and column.

Formats follow TRL: a column holds either a string (standard) or a list of ``{"role", "content"}``
messages (conversational), and all text columns of a dataset use the same one.
"""

from __future__ import annotations

from collections.abc import Sequence

from align.errors import DataError

SFT_LAYOUTS = (("prompt", "completion"), ("messages",), ("text",))


def _kind(value) -> str | None:
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "conversational"
    return None


def _check_cell(value, where: str) -> str:
    kind = _kind(value)
    if kind is None:
        raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")
    if kind == "standard":
        if not value.strip():
            raise DataError(f"{where}: is empty")
        return kind
    if not value:
        raise DataError(f"{where}: has no messages")
    for j, msg in enumerate(value):
        if "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: message {j} needs 'role' and 'content' keys")
        if not str(msg["content"] or "").strip():
            raise DataError(f"{where}: message {j} ({msg['role']}) is empty")
    return kind


def check_rows(ds, columns: Sequence[str], split: str = "train") -> str:
    """Every row of ``columns`` is a non-empty string, or a non-empty message list; one format for all.

    Returns ``"standard"`` or ``"conversational"``.
    """
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{split} dataset: missing column {missing[0]!r} (has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{split} dataset: has no rows")
    fmt = None
    for i, row in enumerate(ds.select_columns(list(columns))):
        for col in columns:
            kind = _check_cell(row[col], f"{split} row {i}, column {col!r}")
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise DataError(f"{split} row {i}, column {col!r}: is {kind} but earlier cells are {fmt}")
    return fmt


def sft_layout(ds, split: str = "train") -> tuple[str, ...]:
    """Which SFT layout ``ds`` has (prompt/completion, messages, or text), with every row checked."""
    for layout in SFT_LAYOUTS:
        if all(c in ds.column_names for c in layout):
            check_rows(ds, layout, split)
            return layout
    wanted = " or ".join("+".join(layout) for layout in SFT_LAYOUTS)
    raise DataError(f"{split} dataset: needs columns {wanted} (has: {', '.join(ds.column_names)})")
