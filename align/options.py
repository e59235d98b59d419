"""``option``: a config field with its ``--help`` text (every config part declares its keys with it); ``to_dict``: a
config as plain values. Imports nothing of align, so any module may use them without a cycle."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import field
from typing import Any


def option(default, help_: str, **kw):
    """A config field with its ``--help`` text; a list or dict default is copied for every instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_}, **kw)
    return field(default=default, metadata={"help": help_}, **kw)


def to_dict(config) -> dict[str, Any]:
    """The config's init fields as plain YAML-safe values (for saving next to outputs)."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        v = getattr(config, f.name)
        if isinstance(v, enum.Enum):
            v = v.value
        out[f.name] = v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)
    return out
