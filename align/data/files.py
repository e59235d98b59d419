"""Reading local data files (.json, .jsonl, .csv, .parquet) with one-line errors that name the file and line.

The ``datasets`` library reads the files; what it cannot read is diagnosed here, after the fact, so a good file
costs nothing extra beyond a streaming UTF-8 check of text files: an empty file, bytes that are not UTF-8, an
invalid JSON line, a key given twice, a CSV row with the wrong number of fields, a header-only CSV, a CSV header
naming a column twice, a file that is not parquet. Lines count from 1, as editors do.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import logging
import os

from align.errors import DataError

TEXT_FORMATS = ("json", "csv")
CHUNK = 1 << 20


def load_file(path: str, fmt: str, key: str = "dataset_name"):
    """The rows of local file ``path`` (``fmt``: json, csv or parquet) as a ``datasets.Dataset``; a one-line
    DataError naming ``key``, the file and (where there is one) the line for a file that cannot be read."""
    import datasets

    where = f"{key} {path!r}"
    if os.path.getsize(path) == 0:
        raise DataError(f"{where}: the file is empty")
    if fmt in TEXT_FORMATS:
        check_utf8(path, where)
    if fmt == "parquet":
        check_parquet(path, where)
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 -- datasets and pyarrow raise many kinds; diagnose the file instead
        if "corresponds to no data" in str(err):
            raise DataError(f"{where}: has no rows") from None
        raise DataError(f"{where}{diagnose(path, fmt, err)}") from None
    if fmt == "csv":
        check_csv_header(path, where)
    if len(ds) == 0:
        raise DataError(f"{where}: has no rows")
    return ds


@contextlib.contextmanager
def quiet_datasets():
    """``datasets`` logs its own ``Failed to load JSON ...`` lines before raising; the one-line error says it."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_utf8(path: str, where: str) -> None:
    """A DataError naming the line and byte of the first bytes that are not UTF-8 (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, done = 1, False
    with open(path, "rb") as fh:
        while not done:
            chunk = fh.read(CHUNK)
            done = not chunk
            try:
                decoder.decode(chunk, final=done)
            except UnicodeDecodeError as err:
                # err.start indexes the bytes this call was given (what the decoder held back, then the chunk)
                held = err.object
                line += held[: err.start].count(b"\n")
                raise DataError(f"{where} line {line}: not UTF-8 text (byte 0x{held[err.start]:02x}); save the file "
                                "as UTF-8") from None
            line += chunk.count(b"\n")


def check_parquet(path: str, where: str) -> None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # noqa: BLE001 -- pyarrow's errors: say the file is not parquet, and why
        raise DataError(f"{where}: not a readable parquet file ({first_line(err)})") from None
    if rows == 0:
        raise DataError(f"{where}: has no rows")


def check_csv_header(path: str, where: str) -> None:
    """A column named twice is silently renamed (``prompt.1``) by the reader: refuse it."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{where} line 1: column {name!r} appears twice in the header")
        seen.add(name)


def diagnose(path: str, fmt: str, err: Exception) -> str:
    """What is wrong with a file the reader failed on, as ``" line <n>: <what>"`` or ``": <what>"``."""
    found = {"json": json_problem, "csv": csv_problem}.get(fmt, lambda _: None)(path)
    return found or f": could not be read as {fmt} ({first_line(err)})"


def first_line(err: BaseException) -> str:
    """The first line of the innermost cause of ``err`` (the reader's own words, not its wrapper's)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"key {k!r} appears twice in one object")
    return dict(pairs)


def _parse_json(text: str, line: int | None) -> tuple[object, str | None]:
    """(value, None), or (None, the problem) for ``text`` (the whole file when ``line`` is None, else that line)."""
    at = "" if line is None else f" line {line}"
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys), None
    except json.JSONDecodeError as err:
        return None, f" line {err.lineno if line is None else line}: invalid JSON ({err.msg} at column {err.colno})"
    except ValueError as err:
        return None, f"{at}: {err}"


def json_problem(path: str) -> str | None:
    """The first problem of a JSON file: one array or object, or one object per line (JSON Lines)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        value, problem = _parse_json(text, None)
        if problem:
            return problem
        bad = next((i for i, row in enumerate(value) if not isinstance(row, dict)), None)
        return None if bad is None else f": item {bad} of the array is not an object ({{...}})"
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        value, problem = _parse_json(line, n)
        if problem:
            return problem
        if not isinstance(value, dict):
            return f" line {n}: expected one JSON object ({{...}}) per line, got {type(value).__name__}"
    return None


def csv_problem(path: str) -> str | None:
    """The first CSV row whose number of fields differs from the header's."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    return f" line {reader.line_num}: {len(row)} fields, but the header has {len(header)}"
        except csv.Error as err:
            return f" line {reader.line_num}: {err}"
    return None
