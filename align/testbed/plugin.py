"""The testbed as a plugin: registers the ``testbed:`` name prefix for models (``testbed:base``,
``testbed:policy``) and datasets (``testbed:<kind>``).

:mod:`align.modeling` imports this module by name (its ``PLUGINS`` table) on the first ``testbed:`` name it
meets; nothing in the library imports it directly.
"""

from __future__ import annotations

from align.data.loading import DatasetSource, register_dataset_source
from align.errors import ConfigError, DataError
from align.modeling import ModelSource, register_model_source

PREFIX = "testbed"
MODELS = ("base", "policy")
# Rows per split when the config sets no limit.
SIZES = {"train": 1024, "test": 64}


def check_model(name: str, which: str, key: str) -> None:
    if which not in MODELS:
        raise ConfigError(f"{key}: unknown testbed model {name!r} (use testbed:base or testbed:policy)")


def resolve_model(which: str) -> str:
    """The folder of testbed model ``which``, building the testbed first when it is not cached."""
    from align.testbed.build import ensure_testbed

    return str(getattr(ensure_testbed(), which))


def check_dataset(name: str, kind: str, key: str) -> None:
    from align.testbed.tasks import KINDS

    if kind not in KINDS:
        known = ", ".join(f"{PREFIX}:{k}" for k in KINDS)
        raise ConfigError(f"{key}: unknown testbed dataset {name!r} (known: {known})")


def load_dataset(args, name: str, kind: str, split: str, limit: int | None):
    """Split ``split`` of testbed dataset ``kind`` (the config's ``testbed_tasks``, ``seed``, ``testbed_format``)."""
    from align.testbed.tasks import dataset

    if split not in SIZES:
        raise DataError(f"split {split!r} of {name!r} does not exist (testbed splits: train, test)")
    try:
        return dataset(kind, args.testbed_tasks, limit or SIZES[split], split, args.seed, args.testbed_format)
    except ValueError as err:
        raise DataError(f"{name}: {err}") from None


register_model_source(PREFIX, ModelSource(check_model, resolve_model))
register_dataset_source(PREFIX, DatasetSource(check_dataset, load_dataset))
