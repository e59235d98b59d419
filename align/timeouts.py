"""Calls with a deadline: user code the trainers wait on (``module:function`` rewards, reward models, judges) runs
in a daemon thread, and a call that has not returned after its deadline raises :class:`DeadlineExceeded` in the
caller, which turns it into a one-line error naming the function and the prompts.

Python cannot stop a thread: a timed-out call keeps running in the background until it returns (or the process
ends; the thread is a daemon, so it never holds up the interpreter's exit). The deadline is checked by the
waiting thread, so it holds whenever the call lets go of the GIL now and then (pure Python, I/O, sleeps, torch
ops); a C extension that holds the GIL for good blocks the waiting thread as well.

The worker thread gets the caller's autograd mode and CUDA device (both are per thread in torch), so a reward
model scores under ``torch.no_grad()`` on the same GPU as it would inline.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from align.errors import ConfigError

T = TypeVar("T")

# The default of the ``reward_timeout_s`` option: generous for a reward model or a judge scoring a large batch.
REWARD_TIMEOUT_S = 600.0
REWARD_TIMEOUT_HELP = ("Seconds one call of a reward function or oracle may take (a `module:function`, a `model:` "
                       "reward model, a judge; one call scores a batch); then the run stops naming the function and "
                       "the prompt ids (RL with on_reward_error: zero: the batch scores 0). Registered rewards "
                       "(accuracy, math_verify, ...) run inline, unbounded by it.")
# The default of the ``vllm_request_timeout_s`` option: the longest one rollout-server request may take in all.
REQUEST_TIMEOUT_S = 1800.0


class DeadlineExceeded(Exception):
    """A call did not return within ``timeout_s`` seconds (it may still be running in its thread)."""

    def __init__(self, timeout_s: float):
        super().__init__(f"no return within {timeout_s:g}s")
        self.timeout_s = timeout_s


def check_timeout(key: str, value: Any) -> None:
    """A one-line ConfigError unless ``value`` is a finite number of seconds > 0 (no wait goes unbounded)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{key}: must be a finite number of seconds > 0 (every wait is bounded; give a larger "
                          f"number for a slow function), got {value!r}")


def call_with_deadline(fn: Callable[..., T], timeout_s: float | None, /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread: its result, or the exception it raised (re-raised here), or
    :class:`DeadlineExceeded` when it has not returned after ``timeout_s`` seconds. ``None``: call inline."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    if not timeout_s > 0:
        raise ValueError(f"call_with_deadline: timeout_s must be > 0, got {timeout_s}")
    import torch

    done = threading.Event()
    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def work() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller as is
            box["error"] = err
        finally:
            done.set()

    name = getattr(fn, "__name__", type(fn).__name__)
    threading.Thread(target=work, name=f"align-deadline-{name}", daemon=True).start()
    if not done.wait(min(timeout_s, threading.TIMEOUT_MAX)):
        raise DeadlineExceeded(timeout_s)
    if "error" in box:
        error = box.pop("error")
        try:
            raise error
        finally:
            del error  # no reference cycle through the traceback
    return box["value"]
