"""Length rewards: DAPO's soft overlong punishment, and rewards that favour longer answers.

``length`` scores a completion by its length in characters (``length_reward``); ``accuracy_and_length``
adds it, scaled by ``LENGTH_WEIGHT``, to the verifier's 0/1 accuracy: a judge that prefers right answers and,
among equally right ones, longer ones, a stand-in for a length-biased reward model (iLR-DPO's testbed
evidence, docs/methods.md §7: with it, plain iterative DPO inflates length).

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476),
Eq. 13: for a completion of ``L`` tokens, a maximum length ``L_max`` and a punishment interval
(cache) ``L_cache``::

    R(L) = 0                              if L <= L_max - L_cache
    R(L) = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
    R(L) = -1                             if L > L_max

The penalty ramps linearly from 0 to -1 over the last ``L_cache`` tokens, so a truncated completion
scores -1 and the policy learns to finish before the limit. It is added to the task reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from align.rewards.math import completion_text

LENGTH_WEIGHT = 0.1  # accuracy_and_length: reward per character (10 characters are worth one right answer)


def _chars(completion: Any) -> int:
    return len(completion_text(completion))


def length_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """The length of each completion in characters (a conversational completion: its last message)."""
    return [float(_chars(c)) for c in completions]


def accuracy_and_length(completions: Sequence[Any], answer: Sequence[int | str], **_: Any) -> list[float]:
    """Verifier accuracy (0/1) plus ``LENGTH_WEIGHT`` per character: right beats wrong unless the wrong one is
    10 characters longer; between equally right answers the longer wins."""
    from align.rewards.math import accuracy_reward

    return [a + LENGTH_WEIGHT * _chars(c) for a, c in zip(accuracy_reward(completions, answer), completions,
                                                         strict=True)]


def _check(max_completion_length: int, cache_length: int) -> None:
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
        raise ValueError(f"max_completion_length must be an integer, got {max_completion_length!r}")
    if max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be positive, got {max_completion_length}")
    if isinstance(cache_length, bool) or not isinstance(cache_length, int):
        raise ValueError(f"cache_length must be an integer, got {cache_length!r}")
    if not 0 <= cache_length <= max_completion_length:
        raise ValueError(
            f"cache_length must be in [0, max_completion_length={max_completion_length}], got {cache_length}"
        )


def soft_overlong_punishment(lengths: Sequence[int], max_completion_length: int, cache_length: int) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, Eq. 13) for each completion length in tokens.

    0 up to ``max_completion_length - cache_length`` tokens, then linear down to -1 at
    ``max_completion_length``, and -1 beyond. With ``cache_length == 0`` it is a hard 0 / -1 step.
    """
    _check(max_completion_length, cache_length)
    start = max_completion_length - cache_length
    out = []
    for length in lengths:
        length = int(length)
        if length <= start:
            out.append(0.0)
        elif length <= max_completion_length:
            out.append((start - length) / cache_length)
        else:
            out.append(-1.0)
    return out


def overlong_reward(max_completion_length: int, cache_length: int) -> Callable[..., list[float]]:
    """A reward function ``fn(completions, completion_lengths, **_)`` applying the DAPO soft overlong punishment.

    ``completion_lengths`` are the completions' lengths in tokens (the trainer supplies them).
    """
    _check(max_completion_length, cache_length)

    def overlong(completions: Sequence[Any], completion_lengths: Sequence[int], **_: Any) -> list[float]:
        lengths = completion_lengths.tolist() if hasattr(completion_lengths, "tolist") else list(completion_lengths)
        if len(lengths) != len(completions):
            raise ValueError(f"overlong: {len(completions)} completions but {len(lengths)} completion_lengths")
        return soft_overlong_punishment(lengths, max_completion_length, cache_length)

    overlong.__name__ = "overlong"
    overlong.__qualname__ = "overlong"
    return overlong
