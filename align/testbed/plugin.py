"""The testbed as a plugin: registers the ``testbed:`` name prefix for models (``testbed:base``,
``testbed:policy``; spec 3's ``testbed:v3-base``, ``testbed:v3-policy``) and datasets (``testbed:<kind>``: spec 2's
tasks or spec 3's, by the names in ``testbed_tasks``).

:mod:`align.modeling` imports this module by name (its ``PLUGINS`` table) on the first ``testbed:`` name it
meets; nothing in the library imports it directly.
"""

from __future__ import annotations

from align.data.loading import DatasetSource, register_dataset_source
from align.errors import ConfigError, DataError
from align.modeling import ModelSource, register_model_source

PREFIX = "testbed"
MODELS = ("base", "policy", "v3-base", "v3-policy")
# Rows per split when the config sets no limit.
SIZES = {"train": 1024, "test": 64}


def check_model(name: str, which: str, key: str) -> None:
    if which not in MODELS:
        raise ConfigError(f"{key}: unknown testbed model {name!r} (use testbed:base, testbed:policy, "
                          "testbed:v3-base or testbed:v3-policy)")


def resolve_model(which: str) -> str:
    """The folder of testbed model ``which``, building the testbed first when it is not cached."""
    from align.testbed.build import ensure_testbed

    spec, _, part = which.rpartition("-")
    return str(getattr(ensure_testbed(spec=3 if spec == "v3" else 2), part))


def check_dataset(name: str, kind: str, key: str) -> None:
    from align.testbed.tasks import KINDS

    if kind not in KINDS:
        known = ", ".join(f"{PREFIX}:{k}" for k in KINDS)
        raise ConfigError(f"{key}: unknown testbed dataset {name!r} (known: {known})")


def load_dataset(args, name: str, kind: str, split: str, limit: int | None):
    """Split ``split`` of testbed dataset ``kind`` (the config's ``testbed_tasks``, ``seed``, ``testbed_format``)."""
    from align.testbed import arith, tasks

    dataset = arith.dataset if is_spec3(args.testbed_tasks) else tasks.dataset
    if split not in SIZES:
        raise DataError(f"split {split!r} of {name!r} does not exist (testbed splits: train, test)")
    try:
        return dataset(kind, args.testbed_tasks, limit or SIZES[split], split, args.seed, args.testbed_format)
    except ValueError as err:
        raise DataError(f"{name}: {err}") from None


def is_spec3(names) -> bool:
    """Whether testbed task names are spec 3's (:mod:`align.testbed.arith`); the config refuses a mix."""
    from align.testbed.arith import TASKS

    return bool(names) and all(n in TASKS for n in names)


register_model_source(PREFIX, ModelSource(check_model, resolve_model))
register_dataset_source(PREFIX, DatasetSource(check_dataset, load_dataset))
