"""Reward functions by name, and a weighted set of them as the RL trainers use it.

A reward spec is a registered name (``accuracy``), an importable ``package.module:function`` or
``model:<path>`` for a learned reward model. Functions follow TRL's convention (``fn(completions, **kwargs)``,
https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function): the dataset's
columns arrive as keyword lists. The total reward is the weighted sum Σ_k w_k r_k, as in TRL's
``reward_weights``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from align.errors import ConfigError, DataError, TrainingError
from align.rewards.length import accuracy_and_length, length_reward, overlong_reward
from align.rewards.math import accuracy_reward, closeness_reward, format_reward
from align.rewards.math_verify import math_verify_reward
from align.timeouts import REWARD_TIMEOUT_S, DeadlineExceeded, call_with_deadline

RewardFn = Callable[..., list[float]]

REWARD_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "accuracy": accuracy_reward,  # needs column `answer`
    "format": format_reward,
    "closeness": closeness_reward,  # needs column `answer`; −log(1 + |error|)
    "math_verify": math_verify_reward,  # needs column `solution`
    "overlong": overlong_reward,  # factory: options max_completion_length, overlong_cache_length
    "length": length_reward,  # characters
    "accuracy_and_length": accuracy_and_length,  # needs column `answer`; a length-biased judge
}
# Registered factories: factory argument -> the option that supplies it.
FACTORY_OPTIONS: dict[str, dict[str, str]] = {
    "overlong": {"max_completion_length": "max_completion_length", "cache_length": "overlong_cache_length"},
}
# Arguments the trainer supplies itself: never dataset columns.
TRAINER_ARGS = frozenset({"completions", "prompts", "completion_ids", "completion_lengths", "prompt_ids"})
ON_ERROR = ("raise", "zero")
logger = logging.getLogger(__name__)


def _known() -> str:
    return ", ".join(REWARD_FUNCTIONS)


def resolve_reward(spec: str, options: dict[str, Any] | None = None) -> RewardFn:
    """The reward function a spec names: a registered name, ``package.module:function`` or ``model:<path>``."""
    options = options or {}
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward_funcs: a reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in FACTORY_OPTIONS:
        kwargs = {}
        for arg, option in FACTORY_OPTIONS[spec].items():
            if options.get(option) is None:
                raise ConfigError(f"reward_funcs: reward function {spec!r} needs the option {option!r}")
            kwargs[arg] = options[option]
        try:
            return REWARD_FUNCTIONS[spec](**kwargs)
        except ValueError as e:
            raise ConfigError(f"reward_funcs: reward function {spec!r}: {e}") from None
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if spec.startswith("model:"):
        path = spec[len("model:") :]
        if not path:
            raise ConfigError(f"reward_funcs: {spec!r} names no reward model path")
        from align.rewards.model import RewardModel

        try:
            return RewardModel(path)
        except Exception as e:  # any load failure is a config problem here
            raise ConfigError(
                f"reward_funcs: cannot load reward model {path!r}: {type(e).__name__}: {_one_line(e)}"
            ) from None
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"reward_funcs: {spec!r} is not of the form 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # import errors of any kind
            raise ConfigError(
                f"reward_funcs: cannot import {module_name!r} for {spec!r}: {type(e).__name__}: {_one_line(e)}"
            ) from None
        fn: Any = module
        for part in attr.split("."):
            if not hasattr(fn, part):
                raise ConfigError(f"reward_funcs: module {module_name!r} has no attribute {attr!r} (spec {spec!r})")
            fn = getattr(fn, part)
        if not callable(fn):
            raise ConfigError(f"reward_funcs: {spec!r} is not callable (it is a {type(fn).__name__})")
        return fn
    raise ConfigError(
        f"reward_funcs: unknown reward function {spec!r} (known: {_known()}; "
        "or 'package.module:function', or 'model:<path>')"
    )


def required_columns(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The dataset columns ``fn`` needs: its parameters without a default, less those the trainer supplies."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in TRAINER_ARGS
    )


def _display_name(spec: Any, fn: Callable[..., Any]) -> str:
    if isinstance(spec, str) and spec.strip() in REWARD_FUNCTIONS:
        return spec.strip()
    return getattr(fn, "__name__", None) or type(fn).__name__


def is_registered(spec: Any) -> bool:
    """True for the name of a registered reward (ours, run inline); False for user code (``module:function``, a
    ``model:`` reward model, a callable), which runs under ``reward_timeout_s``."""
    return isinstance(spec, str) and spec.strip() in REWARD_FUNCTIONS


def timeout_message(what: str, timeout_s: float, prompt_ids: Sequence[Any]) -> str:
    """The one line for a call that did not return in time: what it was, the option, and the prompts it scored."""
    ids = list(dict.fromkeys(i for i in prompt_ids if i is not None))
    shown = ", ".join(str(i) for i in ids[:8]) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
    where = f" (prompt id{'s' if len(ids) > 1 else ''} {shown})" if ids else ""
    return (f"{what} did not return within reward_timeout_s={timeout_s:g}s{where}; it may hang, or need a larger "
            "reward_timeout_s")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RewardSet:
    """Weighted reward functions: ``total = Σ_k w_k r_k`` per completion, with per-function scores and error counts.

    ``specs`` are reward specs (see ``resolve_reward``) or callables; ``weights`` default to 1.0 each.
    ``on_error="raise"`` turns a failing function (exception, timeout, wrong count, NaN/inf/None score) into a
    ``TrainingError``; ``on_error="zero"`` scores the bad items 0.0 and counts them in ``errors``.
    Every call of user code (not a registered name) gets ``timeout_s`` seconds (:mod:`align.timeouts`; ``None``:
    unbounded, for a caller that bounds the call itself); a call that has not returned by then failed for the
    whole batch.
    """

    def __init__(
        self,
        specs: Sequence[str | Callable[..., Any]],
        weights: Sequence[float] | None = None,
        options: dict[str, Any] | None = None,
        on_error: str = "raise",
        timeout_s: float | None = REWARD_TIMEOUT_S,
    ):
        if isinstance(specs, str):
            specs = [specs]
        specs = list(specs or [])
        if not specs:
            raise ConfigError(f"reward_funcs: no reward functions given (known: {_known()})")
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_reward_error: must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if weights is None:
            weights = [1.0] * len(specs)
        weights = list(weights)
        if len(weights) != len(specs):
            raise ConfigError(
                f"reward_weights: {len(weights)} weights for {len(specs)} reward functions (reward_funcs); "
                "give one weight per function"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ConfigError(f"reward_weights: weights must be finite numbers, got {w!r}")
        self.functions: list[Callable[..., Any]] = [
            spec if callable(spec) else resolve_reward(spec, options) for spec in specs
        ]
        self.weights = [float(w) for w in weights]
        self.on_error = on_error
        self.timeout_s = timeout_s
        self.bounded = tuple(not is_registered(spec) for spec in specs)
        self.specs = tuple(spec.strip() if isinstance(spec, str) else _display_name(spec, fn)
                           for spec, fn in zip(specs, self.functions, strict=True))
        names: list[str] = []
        for spec, fn in zip(specs, self.functions, strict=True):
            base = name = _display_name(spec, fn)
            k = 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        self._names = tuple(names)

    @classmethod
    def from_config(cls, config) -> RewardSet:
        """The set an RL config's keys name: ``reward_funcs``, ``reward_weights``, ``on_reward_error``,
        ``reward_timeout_s`` and the options of the registered factories."""
        options = {"max_completion_length": config.max_completion_length,
                   "overlong_cache_length": config.overlong_cache_length}
        return cls(config.reward_funcs, config.reward_weights, options, config.on_reward_error,
                   config.reward_timeout_s)

    @property
    def names(self) -> tuple[str, ...]:
        """Unique display names, one per function (``accuracy``, ``accuracy_2`` for a repeat)."""
        return self._names

    def __len__(self) -> int:
        return len(self.functions)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"RewardSet({parts}, on_error={self.on_error!r})"

    def check_columns(self, column_names: Sequence[str], where: str = "train dataset") -> None:
        """Raise DataError if a dataset lacks a column that one of the reward functions needs."""
        have = set(column_names)
        for name, fn in zip(self.names, self.functions, strict=True):
            for column in required_columns(fn):
                if column not in have:
                    raise DataError(f"{where}: column {column!r} needed by reward function {name!r} is missing")

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        prompt_ids: Sequence[Any],
        completion_lengths: Sequence[int],
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
        """Score ``R`` completions: (total [R] float32, {name: [R] float32}, {name: number of bad items})."""
        n = len(completions)
        if not (len(prompts) == len(prompt_ids) == len(completion_lengths) == n):
            raise ValueError(
                f"RewardSet: {n} completions but {len(prompts)} prompts, {len(prompt_ids)} prompt_ids "
                f"and {len(completion_lengths)} completion_lengths"
            )
        kwargs = {k: v for k, v in (columns or {}).items() if k not in TRAINER_ARGS}
        kwargs.update(completions=completions, prompts=prompts, completion_lengths=completion_lengths)
        first_id = prompt_ids[0] if n else None
        total = torch.zeros(n, dtype=torch.float32)
        per_function: dict[str, torch.Tensor] = {}
        errors: dict[str, int] = {}
        for k, (name, fn, weight) in enumerate(zip(self.names, self.functions, self.weights, strict=True)):
            scores = torch.zeros(n, dtype=torch.float32)
            bad = 0
            try:
                values = call_with_deadline(fn, self.timeout_s if self.bounded[k] else None, **kwargs)
            except DeadlineExceeded as e:
                message = timeout_message(f"reward function {self.specs[k]!r}", e.timeout_s, prompt_ids)
                if self.on_error == "raise":
                    raise TrainingError(message) from None
                logger.warning("%s: its %d completions score 0 (on_reward_error: zero)", message, n)
                values, bad = None, n
            except Exception as e:  # a user function may fail any way
                if self.on_error == "raise":
                    raise TrainingError(
                        f"reward function {name!r} raised {type(e).__name__} for prompt id {first_id}: {_one_line(e)}"
                    ) from e
                values, bad = None, n
            if values is not None:
                values = values.tolist() if hasattr(values, "tolist") else values
                values = list(values) if not isinstance(values, list) else values
                if len(values) != n:
                    if self.on_error == "raise":
                        raise TrainingError(
                            f"reward function {name!r} returned {len(values)} values for {n} completions "
                            f"(prompt id {first_id})"
                        )
                    bad = n
                else:
                    for i, v in enumerate(values):
                        x = _as_float(v)
                        if x is None:
                            if self.on_error == "raise":
                                raise TrainingError(
                                    f"reward function {name!r} returned {_one_line(repr(v), 60)} "
                                    f"for prompt id {prompt_ids[i]}"
                                )
                            bad += 1
                        else:
                            scores[i] = x
            per_function[name] = scores
            errors[name] = bad
            total += weight * scores
        return total, per_function, errors


def _as_float(value: Any) -> float | None:
    """A score as a finite float, or None when it is None, NaN, infinite or not a number."""
    if value is None or isinstance(value, str):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
