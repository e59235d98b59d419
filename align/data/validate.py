"""Checks on dataset rows, run before any model is loaded; errors name the split, row and column, and the file or
dataset the rows came from (:func:`source_named`).

Formats follow TRL: a column holds either a string (standard) or a list of ``{"role", "content"}``
messages (conversational), and all text columns of a dataset use the same one. Roles are checked by what the
column holds: a ``prompt`` ends with a user (or tool) turn, a response (``chosen``, ``rejected``,
``completion``) starts with the assistant's, and every role is one of :data:`ROLES`. A string that is a message
list written out as text (what a CSV cell holds) is refused: it would train as the text of a Python list.
"""

from __future__ import annotations

import ast
import contextlib
import json
from collections.abc import Sequence

from align.errors import DataError

SFT_LAYOUTS = (("prompt", "completion"), ("messages",), ("text",))
ROLES = ("system", "developer", "user", "assistant", "tool")
# What each column holds: a prompt, a response, or (any other column) a whole conversation.
TURNS = {"prompt": "prompt", "chosen": "response", "rejected": "response", "completion": "response"}
PROMPT_ENDS = ("user", "tool")
RESPONSE_ROLES = ("assistant", "tool")
SOURCE_MARK = "align source: "


def mark_source(ds, name: str):
    """``ds``, remembering that its rows came from ``name`` (a file, folder, Hub id or ``testbed:`` name); the mark
    lives in the dataset's info, which ``select``, ``map`` and ``select_columns`` carry along."""
    ds.info.description = f"{SOURCE_MARK}{name}"
    return ds


def source_of(ds) -> str | None:
    """The name :func:`mark_source` gave ``ds``, or None (a dataset built in memory)."""
    text = getattr(getattr(ds, "info", None), "description", None) or ""
    return text[len(SOURCE_MARK):] if text.startswith(SOURCE_MARK) else None


@contextlib.contextmanager
def source_named(ds):
    """A DataError raised inside gets the source of ``ds`` appended, ``... (in '<file>')``, when it has one."""
    try:
        yield
    except DataError as err:
        source = source_of(ds)
        if source is None or repr(source) in str(err):
            raise
        raise DataError(f"{err} (in {source!r})") from None


def _kind(value) -> str | None:
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "conversational"
    return None


def written_messages(text: str) -> bool:
    """Whether ``text`` is a message list written out as text (JSON or Python repr), as CSV cells hold them."""
    s = text.strip()
    if not (s.startswith("[") and s.endswith("]") and "role" in s):
        return False
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(s)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
    return False


def check_messages(messages: list, where: str, turn: str) -> None:
    """Every message has a known role and non-empty text content; the roles fit ``turn`` (prompt, response or
    conversation)."""
    if not messages:
        raise DataError(f"{where}: has no messages")
    for j, msg in enumerate(messages):
        if "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: message {j} needs 'role' and 'content' keys (has: {', '.join(map(str, msg))})")
        role = msg["role"]
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}, not one of {', '.join(ROLES)}")
        content = msg["content"]
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: message {j} ({role}) content is a {type(content).__name__}, not a string")
        if not (content or "").strip():
            raise DataError(f"{where}: message {j} ({role}) is empty")
        if turn == "response" and role not in RESPONSE_ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}, but a response holds only "
                            f"{' and '.join(RESPONSE_ROLES)} turns (the question belongs in the prompt)")
    if turn == "response" and messages[0]["role"] != "assistant":
        raise DataError(f"{where}: a response starts with an assistant message, not {messages[0]['role']!r}")
    if turn == "prompt" and messages[-1]["role"] not in PROMPT_ENDS:
        raise DataError(f"{where}: the prompt ends with a {messages[-1]['role']!r} message; it must end with a "
                        "user (or tool) turn for the response to answer")


def check_cell(value, where: str, turn: str = "conversation") -> str:
    """One cell: a non-empty string that is not a written-out message list, or well-formed messages
    (:func:`check_messages`). Returns its format, ``"standard"`` or ``"conversational"``."""
    kind = _kind(value)
    if kind is None:
        raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")
    if kind == "standard":
        if not value.strip():
            raise DataError(f"{where}: is empty")
        if written_messages(value):
            raise DataError(f"{where}: holds a message list written as text (as CSV cells do); store real lists "
                            "of messages in a .jsonl, .json or .parquet file")
        return kind
    check_messages(value, where, turn)
    return kind


def check_rows(ds, columns: Sequence[str], split: str = "train", turns: dict[str, str] | None = None) -> str:
    """Every row of ``columns`` is a non-empty string, or a well-formed message list; one format for all.

    ``turns`` overrides what a column holds (default :data:`TURNS`, else a whole conversation). Returns
    ``"standard"`` or ``"conversational"``.
    """
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{split} dataset: missing column {missing[0]!r} (has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{split} dataset: has no rows")
    turns = {**TURNS, **(turns or {})}
    fmt = None
    for i, row in enumerate(ds.select_columns(list(columns))):
        for col in columns:
            kind = check_cell(row[col], f"{split} row {i}, column {col!r}", turns.get(col, "conversation"))
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise DataError(f"{split} row {i}, column {col!r}: is {kind} but earlier cells are {fmt}")
    return fmt


def check_values(ds, column: str, split: str, reader: str) -> None:
    """Every row of ``column`` (read by ``reader``, e.g. a reward function) has a value: not null, not NaN, not an
    empty string. Such a row would otherwise fail, or score as wrong, only when it is first sampled."""
    for i, value in enumerate(ds[column]):
        empty = value is None or value != value or (isinstance(value, str) and not value.strip())
        if empty:
            what = "null" if value is None else "NaN" if value != value else "empty"
            raise DataError(f"{split} row {i}, column {column!r}: is {what}, and {reader} reads it")


def sft_layout(ds, split: str = "train") -> tuple[str, ...]:
    """Which SFT layout ``ds`` has (prompt/completion, messages, or text), with every row checked."""
    with source_named(ds):
        for layout in SFT_LAYOUTS:
            if all(c in ds.column_names for c in layout):
                check_rows(ds, layout, split)
                return layout
        wanted = " or ".join("+".join(layout) for layout in SFT_LAYOUTS)
        raise DataError(f"{split} dataset: needs columns {wanted} (has: {', '.join(ds.column_names)})")
