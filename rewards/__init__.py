"""Reward functions and verifiers.

Every reward here follows TRL's reward-function convention, so the same callable works in our
trainers and in TRL's: ``fn(completions, **columns) -> list[float]`` where ``completions`` are strings
or conversational message lists and the dataset's other columns (e.g. ``answer``) arrive as keyword
lists of the same length.
"""

from rewards.math import accuracy_reward, extract_answer, format_reward, is_correct

__all__ = ["accuracy_reward", "extract_answer", "format_reward", "is_correct"]
