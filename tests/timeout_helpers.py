"""Functions that never return, for the bounded-wait tests (importable as ``timeout_helpers:<name>`` while pytest
runs, and in a subprocess with ``tests`` on PYTHONPATH)."""

import threading


def never_returns(completions, **_):
    """A reward function that hangs (a judge behind a dead connection, a deadlock)."""
    threading.Event().wait()


def never_judges(prompts, a, b, **_):
    """A preference oracle that hangs."""
    threading.Event().wait()
