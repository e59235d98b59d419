"""Math answer equivalence checked with Hugging Face's Math-Verify (https://github.com/huggingface/Math-Verify).

``math_verify.parse`` extracts the final answer (``\\boxed{}``, ``$...$`` or plain expressions) into sympy
and ``math_verify.verify`` compares gold and prediction symbolically (fractions, decimals, sets, intervals,
equations). This is the verifier used for MATH-style data by e.g. Open-R1 (``accuracy_reward``).

Math-Verify bounds parsing and verification with ``signal.alarm`` time limits, which only work in the
main thread; elsewhere the limits cannot be enforced and are switched off.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from align.rewards.math import completion_text

PARSING_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5


def _timeouts() -> tuple[int | None, int | None]:
    """(parsing, verify) time limits in seconds; None outside the main thread, where signal.alarm is unusable."""
    if threading.current_thread() is threading.main_thread():
        return PARSING_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def _parse_gold(solution: Any, parsing_timeout: int | None) -> list:
    """The gold answer: a full solution is parsed as is; a bare answer (``42``, ``\\frac{1}{2}``) is boxed first."""
    text = str(solution)
    if "\\boxed" in text or "$" in text:
        return parse(text, parsing_timeout=parsing_timeout)
    return parse(f"\\boxed{{{text}}}", parsing_timeout=parsing_timeout) or parse(text, parsing_timeout=parsing_timeout)


def _score(completion: Any, solution: Any) -> float:
    parsing_timeout, verify_timeout = _timeouts()
    try:
        gold = _parse_gold(solution, parsing_timeout)
        if not gold:
            return 0.0
        pred = parse(completion_text(completion), parsing_timeout=parsing_timeout)
        if not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=verify_timeout) else 0.0
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return 0.0


def math_verify_reward(completions: Sequence[Any], solution: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for each completion whose final answer Math-Verify finds equal to the gold ``solution``, else 0.0.

    ``solution`` may be a full worked solution containing ``\\boxed{...}`` or a bare answer such as ``42``.
    Parse failures, verification errors and timeouts score 0.0.
    """
    if len(completions) != len(solution):
        raise ValueError(f"math_verify_reward: {len(completions)} completions but {len(solution)} solutions")
    return [_score(c, s) for c, s in zip(completions, solution, strict=True)]
