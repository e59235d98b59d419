"""Loading datasets by name: names a plugin owns (``testbed:<kind>``), local files or folders, or the Hub."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from align.data.files import load_file
from align.data.validate import mark_source
from align.errors import ConfigError, DataError
from align.modeling import HUB_ID, find_source, hub_offline

DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DatasetSource:
    """How a plugin's dataset names ``<prefix>:<rest>`` are checked and loaded: ``check(name, rest, key)`` raises a
    one-line :class:`ConfigError` naming ``key``; ``load(args, name, rest, split, limit)`` returns the split as a
    ``datasets.Dataset`` (a :class:`DataError` for a split it does not have)."""

    check: Callable[[str, str, str], None]
    load: Callable[..., object]


DATASET_SOURCES: dict[str, DatasetSource] = {}


def register_dataset_source(prefix: str, source: DatasetSource) -> None:
    """Let dataset names ``<prefix>:...`` be checked and loaded by ``source``."""
    DATASET_SOURCES[prefix] = source


def check_dataset_name(name: str, key: str = "dataset_name") -> None:
    """Fail early, without reading data, when ``name`` cannot name a dataset."""
    found = find_source(DATASET_SOURCES, name)
    if found is not None:
        source, rest = found
        source.check(name, rest, key)
        return
    if os.path.exists(name):
        if os.path.isfile(name) and os.path.splitext(name)[1] not in DATA_EXTENSIONS:
            raise ConfigError(f"{key}: {name!r} is not a {'/'.join(DATA_EXTENSIONS)} file")
        return
    if name.startswith((".", "/", "~")) or os.path.splitext(name)[1] in DATA_EXTENSIONS or not HUB_ID.match(name):
        raise ConfigError(f"{key}: {name!r} does not exist")
    if hub_offline():
        raise ConfigError(f"{key}: {name!r} is not a local file or folder, and HF_HUB_OFFLINE is set")


def load_split(args, split: str, limit: int | None, name: str | None = None):
    """Split ``split`` of ``name`` (default ``args.dataset_name``) as a ``datasets.Dataset``, at most
    ``limit`` rows, marked with its source (row errors name it, :func:`align.data.validate.source_named`)."""
    import datasets

    name = name or args.dataset_name
    found = find_source(DATASET_SOURCES, name)
    if found is not None:
        source, rest = found
        return source.load(args, name, rest, split, limit)
    if os.path.isfile(name):
        if name == args.dataset_name and split != args.dataset_train_split:
            raise DataError(f"dataset_name {name!r} is a single file, so it has no split {split!r} "
                            "(set eval_dataset_name for evaluation data)")
        key = "dataset_name" if name == args.dataset_name else "eval_dataset_name"
        ds = load_file(name, DATA_EXTENSIONS[os.path.splitext(name)[1]], key)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        dd = datasets.load_from_disk(name)
        if split not in dd:
            raise DataError(f"split {split!r} not in {name!r} (has: {', '.join(dd)})")
        ds = dd[split]
    else:
        try:
            dd = datasets.load_dataset(name, args.dataset_config)
        except Exception as err:  # noqa: BLE001 -- datasets raises many kinds; say which dataset failed
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"dataset_name {name!r} could not be loaded: {first}") from None
        if split not in dd:
            raise DataError(f"split {split!r} not in {name!r} (has: {', '.join(dd)})")
        ds = dd[split]
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return mark_source(ds, name)


def load_train_eval(args):
    """The (train, eval-or-None) datasets a recipe config asks for."""
    train = load_split(args, args.dataset_train_split, args.max_train_samples)
    evaluation = None
    if args.dataset_test_split:
        evaluation = load_split(args, args.dataset_test_split, args.max_eval_samples, args.eval_dataset_name)
    return train, evaluation
