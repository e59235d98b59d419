"""Progress on the long waits (rollouts, GVM estimation, oracle calls, reference passes, weight pushes,
evaluation): one tqdm bar per stage, on the main process only.

    with progress.bar("rollouts (round 3)", total=32, unit="completions", show=progress.shown(args, is_main),
                      groups=[4] * 8, groups_total=8, group_unit="prompts") as stage:
        out = engine.generate(...)   # the HF engine calls progress.advance(len(batch), "completions")
        ...                          # gather every process's results
        stage.finish()               # every process's share is in: the bar reaches its total

A line reads ``rollouts (round 3): 100%|████| 32/32 completions, 8/8 prompts [00:02<00:00, 14.1 completions/s]``.

Counts are of the whole job, over every process. The main process advances the bar with its own share as it
goes, and :meth:`Bar.finish` takes it to the total once the shares are gathered; a stage with no gather of its own
counts the main process's share (``total`` is then that share, and the description says so). ``groups``: the
sizes, in the order they complete, of the units a second count is made of (each prompt's completions): a group is
done when all of its items are.

The code that does the work ticks the stage it is part of with :func:`advance` (a no-op when no bar of that unit
is open), so an engine or an oracle needs no bar of its own. Bars are quiet (no output at all) on every process
but the main one, with ``disable_tqdm``, and when transformers' progress bars are off
(``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``transformers.utils.logging.disable_progress_bar()``). A bar nested in
another (the Trainer's training bar) is cleared when it closes, as the Trainer's evaluation bar is; its final
state is written first, so a log file keeps it.
"""

from __future__ import annotations

import bisect
import itertools
from contextvars import ContextVar

__all__ = ["Bar", "advance", "bar", "shown"]

_OPEN: ContextVar[tuple[Bar, ...]] = ContextVar("align_progress_bars", default=())
_FORMAT = ("{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{unit}{postfix} "
           "[{elapsed}<{remaining}, {rate_noinv_fmt}]")


def shown(args, is_main: bool) -> bool:
    """Whether a process shows progress: the main process, ``disable_tqdm`` unset in ``args`` (any object; a
    missing attribute counts as unset), and transformers' progress bars on."""
    from transformers.utils import logging

    return bool(is_main and not getattr(args, "disable_tqdm", False) and logging.is_progress_bar_enabled())


class Bar:
    """One stage's bar (see the module docstring). ``n``: items done; ``groups_done``: groups done. Without
    ``show`` (or with nothing to count) it writes nothing and counts nothing, so callers need no checks."""

    def __init__(self, desc: str, total: int, unit: str, *, show: bool, groups=None, groups_total: int | None = None,
                 group_unit: str = "prompts"):
        self.desc, self.total, self.unit, self.group_unit = desc, int(total), unit, group_unit
        self.ends = list(itertools.accumulate(groups or ()))  # items done when each group is
        self.groups_total = len(self.ends) if groups_total is None else groups_total
        self.n = 0
        self.finished = False
        self.tqdm = None
        if show and self.total > 0:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=self.total, desc=desc, unit=f" {unit}", bar_format=_FORMAT, leave=None,
                             dynamic_ncols=False, postfix=self._postfix())

    @property
    def groups_done(self) -> int:
        if self.finished:
            return self.groups_total
        return bisect.bisect_right(self.ends, self.n)

    def _postfix(self) -> str | None:
        if not self.groups_total:
            return None
        return f"{self.groups_done}/{self.groups_total} {self.group_unit}"

    def advance(self, n: int = 1) -> None:
        """``n`` more items done (the bar never passes its total)."""
        self.reach(self.n + n)

    def reach(self, n: int) -> None:
        """Items done so far: ``n`` (a count below the current one changes nothing)."""
        if self.tqdm is None:
            return
        n = min(n, self.total)
        if n <= self.n:
            return
        step, self.n = n - self.n, n
        if self.groups_total:
            self.tqdm.set_postfix_str(self._postfix(), refresh=False)
        self.tqdm.update(step)

    def finish(self) -> None:
        """Every process's share is done: the total, every group."""
        self.finished = True
        self.reach(self.total)

    def close(self) -> None:
        if self.tqdm is None:
            return
        bar, self.tqdm = self.tqdm, None
        if bar.leave is False or (bar.leave is None and bar.pos != 0):  # cleared on close: write the end first
            bar.refresh()
        bar.close()

    def __enter__(self) -> Bar:
        self.token = _OPEN.set((*_OPEN.get(), self))
        return self

    def __exit__(self, *exc) -> None:
        _OPEN.reset(self.token)
        self.close()


def bar(desc: str, total: int, unit: str, *, show: bool, groups=None, groups_total: int | None = None,
        group_unit: str = "prompts") -> Bar:
    """A :class:`Bar`; use it as a context manager so :func:`advance` finds it."""
    return Bar(desc, total, unit, show=show, groups=groups, groups_total=groups_total, group_unit=group_unit)


def advance(n: int, unit: str) -> None:
    """``n`` more ``unit`` done in the innermost open bar, when that bar counts ``unit`` (else nothing)."""
    bars = _OPEN.get()
    if bars and bars[-1].unit == unit:
        bars[-1].advance(n)
