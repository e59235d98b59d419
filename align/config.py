"""Config loading: a dataclass from YAML plus ``key=value`` overrides, checked before any work starts.

Every recipe has one flat dataclass config (TRL style: recipe fields plus the TRL/transformers
training arguments it extends). :func:`load_config` builds it from a YAML file and command-line
overrides and stops with a one-line :class:`~align.errors.ConfigError` naming the key when

* a key was renamed (``max_new_tokens: renamed to max_completion_length``: the config class's ``RENAMED``),
* a key does not exist (with the closest known key as a hint),
* a value has the wrong type (``learning_rate=abc``),
* the combination is impossible (each config part's ``validate()``, run by :func:`align.args.validate_config`, or
  transformers' own checks).

Overrides are ``key=value`` or ``--key value`` / ``--key=value``; a value is parsed as YAML where the
field is not a string, so ``lora_target_modules=[q_proj,v_proj]`` and ``report_to=none`` both work.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import shutil
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

import yaml

from align.args import part_of, part_order, validate_config
from align.errors import ConfigError
from align.options import to_dict  # noqa: F401  (align.config.to_dict: the saved config)

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Mismatch(Exception):
    pass


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to type ``tp``; raises _Mismatch when it cannot be."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        # "null"/"~" always mean None; "none" does only where the field takes no free string (report_to=none).
        as_none = isinstance(value, str) and (value.lower() in ("null", "~") or (value.lower() == "none" and str
                                                                                  not in members))
        if value is None or (as_none and type(None) in args):
            if type(None) in args:
                return None
            raise _Mismatch
        enums = [a for a in members if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string must name a member
            return _coerce(value, enums[0])
        # Strings last: a command-line "5" or "true" becomes 5 or True where the field allows it.
        for member in sorted(members, key=lambda a: a is str):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Mismatch from None
                if f.is_integer():
                    return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        allowed = [m.value for m in tp]
        if value in allowed:
            return value
        raise _Mismatch
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            try:  # "[a,b]" is YAML; a broken one ("[add1,") is a type error naming the key, not a parser traceback
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                raise _Mismatch from None
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        out = [_coerce(v, item) for v in value]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _Mismatch from None
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    return value


def _allowed_hint(tp: Any) -> str:
    for a in typing.get_args(tp) or (tp,):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return f" (one of: {', '.join(str(m.value) for m in a)})"
        if typing.get_origin(a) is Literal:
            return f" (one of: {', '.join(map(str, typing.get_args(a)))})"
    return ""


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each init field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``["a=1", "--b", "2", "--c=3"]`` -> ``{"a": "1", "b": "2", "c": "3"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    val = "true"  # a bare flag
                else:
                    i += 1
                    val = tokens[i]
        else:
            key, eq, val = tok.partition("=")
            if not eq:
                raise ConfigError(f"override {tok!r} is not of the form key=value")
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"override {tok!r} has an empty key")
        out[key] = val
        i += 1
    return out


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML lets the last one win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader reports it
                continue
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in YAML file ``path``; a one-line ConfigError naming the file when it is missing, unreadable, not
    UTF-8, not valid YAML, gives a key twice, or is not a mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ConfigError(f"--config: cannot read {str(path)!r} ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"--config: {str(path)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe_load semantics
    except _DuplicateKey as err:
        raise ConfigError(f"--config: {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"--config: {str(path)!r} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def renamed_keys(cls: type) -> dict[str, str]:
    """Old key -> new key, from the ``RENAMED`` maps of ``cls`` and its parts."""
    return {old: new for klass in reversed(cls.__mro__) for old, new in klass.__dict__.get("RENAMED", {}).items()}


def load_config(cls: type, config_path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = ()):
    """Build dataclass ``cls`` from a YAML file and overrides; raise ConfigError naming the bad key."""
    raw: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        raw.update({k: (v, str(config_path)) for k, v in read_yaml(config_path).items()})
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    raw.update({k: (v, "command line") for k, v in extra.items()})

    types_ = field_types(cls)
    renamed = renamed_keys(cls)
    kwargs: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        if key in renamed and key not in types_:
            raise ConfigError(f"{key}: renamed to {renamed[key]} (in {source})")
        if key not in types_:
            close = difflib.get_close_matches(str(key), types_, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        try:
            kwargs[key] = _coerce(value, types_[key])
        except _Mismatch:
            raise ConfigError(
                f"{key}: expected {_describe(types_[key])}{_allowed_hint(types_[key])}, got {value!r} (from {source})"
            ) from None
        if _is_nan(kwargs[key]):  # float("nan") parses, and then compares False with every bound
            raise ConfigError(f"{key}: must be a number, got {value!r} (from {source})")
    precheck = getattr(cls, "precheck", None)  # the trainer part's checks that must come before transformers' own
    if callable(precheck):
        precheck(kwargs)
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as err:
        msg = " ".join(str(err).split())
        raise ConfigError(f"invalid config: {msg}") from None
    validate_config(config)
    return config


def _is_nan(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a ``default_factory`` is called)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_help(cls: type, width: int | None = None) -> str:
    """Every key of config class ``cls`` under its part's heading (in :data:`align.args.PARTS` order): name, type,
    default and help, wrapped to ``width`` columns (default: the terminal's) with a hanging indent."""
    width = width or shutil.get_terminal_size().columns
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types_ = field_types(cls)
    lines, heading = [], None
    for name in part_order(cls, fields):
        title = part_of(cls, name)
        if title != heading:
            heading = title
            lines += ["", f"{title}:"]
        f = fields[name]
        help_ = " ".join(str(f.metadata.get("help", "")).split())
        text = f"{name} ({_describe(types_[name])}, default {default_of(f)!r}): {help_}"
        lines += textwrap.wrap(text, width=max(width, 40), initial_indent="  ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return "\n".join(lines[1:])
