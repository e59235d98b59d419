"""Atomic file writes: every file align writes that a reader may open while (or after) we crash goes through here;
and the tolerant reader of the JSONL logs a run appends to (:func:`read_records`).

A write lands in a temporary file in the target's own folder (same filesystem), is flushed and fsynced, then
renamed over the target with ``os.replace``: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``, on an error it is
    removed and ``path`` is untouched. ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, **dump_kwargs)


def atomic_save(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write bytes to ``path`` atomically with ``write(fh)`` (e.g. ``lambda fh: torch.save(obj, fh)``)."""
    with atomic_open(path, "wb") as fh:
        write(fh)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL log (metrics, allocation, iterations) that may be cut short by a crash or still
    being written: a line that does not parse, or is not an object, is skipped; no file: none."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out
