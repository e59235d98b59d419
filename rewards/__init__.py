"""Reward functions and verifiers.

Every reward here follows TRL's reward-function convention, so the same callable works in our
trainers and in TRL's: ``fn(completions, **columns) -> list[float]`` where ``completions`` are strings
or conversational message lists and the dataset's other columns (e.g. ``answer``) arrive as keyword
lists of the same length.

The light modules load eagerly; those that pull in torch or sympy (``model``, ``math_verify``,
``registry``) load on first use, so ``import rewards.math`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from align.rewards.length import overlong_reward, soft_overlong_punishment
from align.rewards.math import accuracy_reward, extract_answer, format_reward, is_correct

_LAZY = {
    "math_verify_reward": "align.rewards.math_verify",
    "RewardModel": "align.rewards.model",
    "REWARD_FUNCTIONS": "align.rewards.registry",
    "RewardSet": "align.rewards.registry",
    "required_columns": "align.rewards.registry",
    "resolve_reward": "align.rewards.registry",
}

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardModel",
    "RewardSet",
    "accuracy_reward",
    "extract_answer",
    "format_reward",
    "is_correct",
    "math_verify_reward",
    "overlong_reward",
    "required_columns",
    "resolve_reward",
    "soft_overlong_punishment",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'align.rewards' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
