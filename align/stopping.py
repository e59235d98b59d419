"""Clean stops on SIGTERM / SIGINT (what Slurm, Kubernetes and Ctrl-C send).

A recipe run (:func:`align.recipe.main`) installs :func:`signals_handled` for its whole length. What a signal does
depends on where the run is:

* inside a training loop (from ``on_train_begin`` to ``on_train_end`` of a Trainer with :class:`StopCallback`):
  the first signal only sets a flag and prints one line. At the end of each optimizer step where a checkpoint
  resumes the run exactly (:meth:`StopCallback.is_stop_point`: every step, but for RL / EGPO only the last step of
  a prompt batch, and with a vLLM engine synced every k steps only a step after which the weights are pushed
  anyway) every process takes the maximum of its flag over the process group, so a signal that reached one rank
  stops all of them at the same step: the Trainer writes a checkpoint there, leaves its loop, and
  :func:`after_train` raises :class:`Stopped` naming the checkpoint;
* after a training loop ended, until the next :func:`stop_point` (the final save, the rest of an iteration):
  the signal waits for that point, where the ranks agree again and the run stops with the work saved;
* anywhere else (loading, the reference pass, sampling an iteration, evaluation): nothing is lost that a
  resume would not redo, so the run stops at once.

A second signal exits at once (``os._exit``) without saving. Every stop exits with status 128 + the signal's
number (143 for SIGTERM, 130 for SIGINT) and one line, no traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESUME = "resume with resume_from_checkpoint=true"

INTERRUPTIBLE, LOOP, AFTER = "interruptible", "loop", "after"  # the phases of a run, see the module docstring


class Stopped(BaseException):
    """The run was stopped by a signal. ``code`` is the exit status (128 + the signal number); ``line`` the one line
    to print, by this process only when ``show`` (one process speaks for a stop every process agreed on). A
    ``BaseException``, as ``KeyboardInterrupt`` is: raised by the handler wherever the main thread is, it must not be
    caught and re-raised as another error by an ``except Exception`` of a library (or of align's loaders)."""

    def __init__(self, signum: int, line: str, show: bool = True):
        super().__init__(line)
        self.code, self.line, self.show = 128 + signum, line, show

    def report(self) -> int:
        """Print the line (when this process shows it); returns the exit status."""
        if self.show:
            print(self.line, file=sys.stderr, flush=True)
        return self.code


class Watch:
    """What this process knows about signals in the current run (one per process: :data:`WATCH`)."""

    def __init__(self):
        self.reset(installed=False)

    def reset(self, installed: bool) -> None:
        self.installed = installed  # handlers are up (a recipe run): the ranks agree at every possible stop
        self.pid = os.getpid()  # a forked child (a dataloader worker) inherits the handler but is not the run
        self.previous: dict[int, object] = {}
        self.signum: int | None = None  # the first signal this process received
        self.phase = INTERRUPTIBLE
        self.step, self.max_steps = 0, 0  # the loop's last finished step and its length
        self.is_stop_point: Callable[[int], bool] = lambda step: True
        self.stopped: tuple[int, int, str] | None = None  # (signal, step, checkpoint) the ranks agreed to stop at

    def plan(self) -> str:
        """What happens next, said when the first signal arrives."""
        if self.phase == LOOP and self.stopped is not None:
            return f"finishing the checkpoint of step {self.stopped[1]}, then stopping"
        if self.phase == LOOP:
            stop = next((s for s in range(self.step + 1, self.max_steps + 1) if self.is_stop_point(s)), None)
            if stop == self.step + 1:
                return f"finishing step {stop}, then saving a checkpoint"
            if stop is not None:
                return (f"training on to step {stop} (the next step a checkpoint resumes exactly), then saving a "
                        "checkpoint")
            return "finishing the last step and the save after it, then stopping"
        return "finishing the save in progress, then stopping"


WATCH = Watch()


def _say(line: str) -> None:
    """Write one line to stderr from a signal handler (``os.write`` to descriptor 2: never re-enters a half-done
    ``print``)."""
    os.write(2, (line + "\n").encode())


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_signal(signum: int, frame) -> None:
    w = WATCH
    if os.getpid() != w.pid:  # a forked worker: what it would have done without align
        previous = w.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if w.signum is not None:
        _say(f"align: second signal ({_name(signum)}); exiting at once without saving")
        os._exit(128 + signum)
    w.signum = signum
    if w.phase == INTERRUPTIBLE:
        raise Stopped(signum, f"align: stopped by {_name(signum)} outside a training step; nothing saved by this stop")
    _say(f"align: {_name(signum)} received; {w.plan()} (a second signal exits at once)")


@contextmanager
def signals_handled() -> Iterator[Watch]:
    """SIGTERM and SIGINT stop the run cleanly while the block runs (the previous handlers come back after it).
    Outside the main thread (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield WATCH
        return
    WATCH.reset(installed=True)
    WATCH.previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield WATCH
    finally:
        for s, handler in WATCH.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        WATCH.installed = False


def agree(signum: int, device) -> int:
    """The largest ``signum`` over the process group (0: no process received a signal); ``signum`` itself when no
    group is up. Every process must call it at the same point."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopCallback(TrainerCallback):
    """Turns a signal into a checkpoint and the end of the loop, at the same step on every process. ``trainer``
    (optional, an align trainer) says where a checkpoint resumes the run exactly (:meth:`is_stop_point`)."""

    def __init__(self, trainer=None):
        self.trainer = trainer

    def is_stop_point(self, step: int) -> bool:
        """Whether a checkpoint after ``step`` resumes the run exactly: not inside a prompt batch's steps
        (``trainer.batch_repeats``: an RL round's updates, EGPO's extragradient pair; the next batch's rollouts are
        made afresh on resume), and, with a rollout engine that holds its own weights pushed every k steps
        (``trainer.weight_sync``), not where the next generation would use the engine's older weights (a resume
        pushes the current ones). The same answer on every process."""
        if step % max(1, int(getattr(self.trainer, "batch_repeats", 1))):
            return False
        sync = getattr(self.trainer, "weight_sync", None)
        return sync is None or sync.due(step)

    def on_train_begin(self, args, state, control, **kwargs):
        w = WATCH
        w.phase, w.step, w.max_steps, w.stopped = LOOP, state.global_step, state.max_steps, None
        w.is_stop_point = self.is_stop_point

    def on_step_end(self, args, state, control, **kwargs):
        w = WATCH
        w.step = state.global_step
        if not w.installed or not self.is_stop_point(state.global_step):
            return
        signum = agree(w.signum or 0, args.device)
        if signum:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            w.stopped = (signum, state.global_step, folder)
            control.should_log = control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        WATCH.phase = AFTER


def after_train(trainer) -> None:
    """Right after ``trainer.train()`` returns: :class:`Stopped` when its loop stopped on a signal (every process
    raises it; the main one prints where the checkpoint is)."""
    if WATCH.stopped is not None:
        signum, step, folder = WATCH.stopped
        WATCH.signum = WATCH.signum or signum  # from here on, a signal to any process exits it at once
        raise Stopped(signum, f"align: stopped by {_name(signum)} at step {step}; checkpoint in {folder}; {RESUME}",
                      show=trainer.is_world_process_zero())


def stop_point(done: str, device, is_main: bool) -> None:
    """A point every process reaches where the work so far is saved: :class:`Stopped` (``"align: stopped by
    SIGTERM <done>"``) when any process received a signal that the last training loop did not stop on (it came
    after the loop's last stop point); from here on a signal stops the run at once."""
    w = WATCH
    if w.installed and w.phase == AFTER:
        signum = agree(w.signum or 0, device)
        if signum:
            w.signum = w.signum or signum
            raise Stopped(signum, f"align: stopped by {_name(signum)} {done}", show=is_main)
    w.phase = INTERRUPTIBLE
