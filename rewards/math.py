"""Verifiable rewards for integer-answer math tasks.

The answer format is the last ``Answer: <integer>`` in the completion (``Answer: -12``). A completion
with no such line has no answer: it is wrong and fails the format check. Used by the testbed's
arithmetic tasks and by the RL recipes on real math data with integer answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def completion_text(completion: Any) -> str:
    """A completion as plain text: a string as is, a conversational completion as its last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def extract_answer(completion: Any) -> int | None:
    """The integer after the last ``Answer:`` in the completion, or None when there is none."""
    found = ANSWER_RE.findall(completion_text(completion))
    return int(found[-1]) if found else None


def is_correct(completion: Any, answer: int | str) -> bool:
    """True when the completion's extracted answer equals the ground truth ``answer``."""
    got = extract_answer(completion)
    return got is not None and got == int(answer)


def accuracy_reward(completions: Sequence[Any], answer: Sequence[int | str], **_: Any) -> list[float]:
    """1.0 for each completion whose final answer equals the ground truth, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} answers")
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def format_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for each completion that states an answer in the ``Answer: <integer>`` format, else 0.0."""
    return [0.0 if extract_answer(c) is None else 1.0 for c in completions]


def closeness_reward(completions: Sequence[Any], answer: Sequence[int | str], **_: Any) -> list[float]:
    """How near the stated answer is to the truth: −log(1 + |stated − answer|) (0 when right), −5 with no
    answer. A dense judge: unlike the 0/1 verifier, two wrong answers are still ordered."""
    import math

    if len(completions) != len(answer):
        raise ValueError(f"closeness_reward: {len(completions)} completions but {len(answer)} answers")
    out = []
    for c, a in zip(completions, answer, strict=True):
        got = extract_answer(c)
        out.append(-5.0 if got is None else -math.log1p(abs(got - int(a))))
    return out
