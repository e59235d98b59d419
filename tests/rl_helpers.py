"""Reward functions for the RL tests (importable as ``rl_helpers:<name>`` while pytest runs)."""


def constant(completions, **_):
    return [1.0] * len(completions)


def nan_on_odd_answer(completions, answer, **_):
    return [float("nan") if int(a) % 2 else 1.0 for a in answer]
