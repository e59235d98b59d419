"""Loading datasets by name: the testbed (``testbed:<kind>``), local files or folders, or the Hub."""

from __future__ import annotations

import os

from align.errors import ConfigError, DataError
from align.modeling import _HUB_ID, _offline

TESTBED_PREFIX = "testbed:"
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TESTBED_SIZES = {"train": 1024, "test": 64}


def check_dataset_name(name: str, key: str = "dataset_name") -> None:
    """Fail early, without reading data, when ``name`` cannot name a dataset."""
    from align.testbed.tasks import KINDS

    if name.startswith(TESTBED_PREFIX):
        if name[len(TESTBED_PREFIX):] not in KINDS:
            known = ", ".join("testbed:" + k for k in KINDS)
            raise ConfigError(f"{key}: unknown testbed dataset {name!r} (known: {known})")
        return
    if os.path.exists(name):
        if os.path.isfile(name) and os.path.splitext(name)[1] not in DATA_EXTENSIONS:
            raise ConfigError(f"{key}: {name!r} is not a {'/'.join(DATA_EXTENSIONS)} file")
        return
    if name.startswith((".", "/", "~")) or os.path.splitext(name)[1] in DATA_EXTENSIONS or not _HUB_ID.match(name):
        raise ConfigError(f"{key}: {name!r} does not exist")
    if _offline():
        raise ConfigError(f"{key}: {name!r} is not a local file or folder, and HF_HUB_OFFLINE is set")


def load_split(args, split: str, limit: int | None, name: str | None = None):
    """Split ``split`` of ``name`` (default ``args.dataset_name``) as a ``datasets.Dataset``, at most
    ``limit`` rows."""
    import datasets

    name = name or args.dataset_name
    if name.startswith(TESTBED_PREFIX):
        from align.testbed.tasks import dataset

        if split not in TESTBED_SIZES:
            raise DataError(f"split {split!r} of {name!r} does not exist (testbed splits: train, test)")
        n = limit or TESTBED_SIZES[split]
        try:
            return dataset(name[len(TESTBED_PREFIX):], args.testbed_tasks, n, split, args.seed, args.testbed_format)
        except ValueError as err:
            raise DataError(f"{name}: {err}") from None
    if os.path.isfile(name):
        if name == args.dataset_name and split != args.dataset_train_split:
            raise DataError(f"dataset_name {name!r} is a single file, so it has no split {split!r} "
                            "(set eval_dataset_name for evaluation data)")
        ds = datasets.load_dataset(DATA_EXTENSIONS[os.path.splitext(name)[1]], data_files=name, split="train")
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
    return ds


def load_train_eval(args):
    """The (train, eval-or-None) datasets a recipe config asks for."""
    train = load_split(args, args.dataset_train_split, args.max_train_samples)
    evaluation = None
    if args.dataset_test_split:
        evaluation = load_split(args, args.dataset_test_split, args.max_eval_samples, args.eval_dataset_name)
    return train, evaluation
