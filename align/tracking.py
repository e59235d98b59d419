"""Experiment tracking: the trackers ``report_to`` names (tensorboard, trackio, wandb), one run per training run.

transformers' own reporting callbacks open a run at ``on_train_begin`` and close it at ``on_train_end``, so the final
``evaluate()`` after ``train()`` opened a second Trackio run, and a driver that trains several rounds (the iterative
one) restarted the step axis each round. :func:`attach` swaps them, on a Trainer, for one :class:`TrackingCallback`
per training run, which

* opens every tracker on the main process when training begins (or at the first log), and closes them only in
  :meth:`TrackingCallback.close`, after the final evaluation (:func:`align.recipe.train_and_save`, the iterative
  driver's end);
* logs every Trainer log under transformers' names (``train/<key>``, ``eval/<key>``: the loss and every align metric,
  ``rewards/*``, ``allocation/*``, ``gvm/*``, ``entanglement/*``, ``oracle/*``, ``rollout/*``, ``timing/*``) at step
  ``step_offset + global_step`` (the iterative driver moves ``step_offset`` on each round);
* logs tables (:func:`log_table`: the sampled completions of RL and online runs, ``log_completions_steps``):
  tensorboard as markdown text, trackio and wandb as tables;
* continues the same tracker runs when training resumes (their names / ids in ``<output_dir>/tracking.json``), and
  tensorboard drops the events an earlier session logged after the resumed checkpoint (a fresh run, every event
  already in the folder).

Where they write: tensorboard in ``<output_dir>/runs`` (``TENSORBOARD_LOGGING_DIR`` overrides), trackio in its local
database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``, project ``project``), wandb as its environment
says (``WANDB_PROJECT``, else ``project``; ``WANDB_MODE=offline``, ``WANDB_DIR``). Non-main processes log nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass

from transformers import TrainerCallback

from align.errors import ConfigError
from align.options import option, to_dict

# The trackers align logs to itself: report_to name -> the pinned package (the ``tracking`` extra of pyproject.toml).
PINS = {"tensorboard": "tensorboard==2.21.0", "trackio": "trackio==0.43.0", "wandb": "wandb==0.31.0"}
STATE_FILE = "tracking.json"  # tracker run names / ids of this output_dir, for a resumed run


def is_installed(name: str) -> bool:
    """Whether tracker ``name`` (a key of :data:`PINS`) can be imported."""
    return importlib.util.find_spec(name) is not None


def install_command(name: str) -> str:
    """How to install logger ``name``: align's trackers from the ``tracking`` extra or pinned, others by name."""
    if name in PINS:
        return f"pip install -e '.[tracking]' from a clone, or pip install {PINS[name]}"
    return f"pip install {name}"


def requested(report_to) -> list[str]:
    """The trackers of :data:`PINS` that ``report_to`` asks for (``all``: every one installed)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        return [n for n in PINS if is_installed(n)]
    return [n for n in PINS if n in names]


@dataclass
class CompletionsLogArguments:
    """The sampled-completions table of the trainers that sample (RL, online); listed in the trainer part, with
    ``report_to``."""

    log_completions_steps: int = option(0, "Every this many rounds (RL) or optimizer steps (online), a table of the "
                                           "round's prompts, completions and rewards to the report_to trackers "
                                           "(tensorboard: text; trackio, wandb: a table); 0 = off.")

    def validate(self) -> None:
        if self.log_completions_steps < 0:
            raise ConfigError(f"log_completions_steps: must be >= 0 (0 = off), got {self.log_completions_steps}")


def completions_due(args, index: int) -> bool:
    """Whether round / step ``index`` (from 0) logs its completions table: ``log_completions_steps`` is on, divides
    ``index``, and a tracker is named (the same answer on every process: building the table gathers)."""
    every = getattr(args, "log_completions_steps", 0)
    return bool(every) and index % every == 0 and bool(requested(args.report_to))


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """``rows`` as a markdown table (tensorboard renders text as markdown)."""

    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tracked_config(config) -> dict:
    """The config as the trackers record it: as ``align_config.yaml``, without secrets
    (:func:`align.hub_args.public_config`)."""
    from align.hub_args import public_config

    return public_config(to_dict(config))


# --- the trackers: open(config, start step, earlier run id) / log / table / close ---------------------------------


class TensorBoardTracker:
    def __init__(self, config, start: int, resume_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(config.output_dir, "runs")
        # purge_step: a reader drops the folder's earlier events from this step on (all of them for a fresh run)
        self.writer = SummaryWriter(self.dir, purge_step=start + 1 if start else 0)
        self.id = self.dir
        if not start:
            self.writer.add_text("config", f"```\n{json.dumps(tracked_config(config), indent=1, default=str)}\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.writer.add_text(key, markdown_table(columns, rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioTracker:
    def __init__(self, config, start: int, resume_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=config.project, name=resume_id or config.run_name,
                                resume="allow" if resume_id else "never", config=tracked_config(config),
                                space_id=getattr(config, "trackio_space_id", None), embed=False)
        self.id = self.run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({key: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class WandbTracker:
    STEP = "train/global_step"  # the x axis of every metric, as transformers' callback sets it

    def __init__(self, config, start: int, resume_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or config.project, name=config.run_name,
                              id=resume_id, resume="allow" if resume_id else None, config=tracked_config(config))
        self.run.define_metric(self.STEP)
        self.run.define_metric("*", step_metric=self.STEP, step_sync=True)
        self.id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, self.STEP: step})

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows), self.STEP: step})

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "trackio": TrackioTracker, "wandb": WandbTracker}


class TrackingCallback(TrainerCallback):
    """The trackers of one training run (``config``: the run's config, for ``report_to``, ``output_dir``, ``project``
    and ``run_name``); shared by every Trainer of the run (:func:`attach`), closed by :meth:`close`."""

    def __init__(self, config):
        self.config = config
        self.names = requested(config.report_to)
        self.step_offset = 0  # added to each Trainer's global_step (the iterative driver's earlier rounds)
        self.trackers: dict | None = None

    def open(self, step: int) -> None:
        """Open every tracker (main process only; once). ``step`` > 0: a resumed run, whose tracker runs continue."""
        if self.trackers is not None or not self.names:
            return
        from align.io import atomic_write_json

        state = os.path.join(self.config.output_dir, STATE_FILE)
        earlier = {}
        if step and os.path.isfile(state):
            with open(state, encoding="utf-8") as fh:
                earlier = json.load(fh)
        self.trackers = {n: TRACKERS[n](self.config, step, earlier.get(n)) for n in self.names}
        atomic_write_json(state, {n: t.id for n, t in self.trackers.items()}, indent=1)

    def log(self, metrics: dict, step: int) -> None:
        """Log the numbers of ``metrics`` (already named as they are to appear) at ``step`` (main process only)."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and self.names:
            self.open(step)
            for tracker in self.trackers.values():
                tracker.log(numbers, step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.names:
            self.open(step)
            for tracker in self.trackers.values():
                tracker.table(key, columns, rows, step)

    def close(self) -> None:
        """Finish every tracker run (after the final evaluation); a later log would open new ones. A tracker that
        fails to finish (a Space out of reach) costs one warning line, never the run."""
        trackers, self.trackers = self.trackers or {}, None
        for name, tracker in trackers.items():
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 -- the model is trained and saved by now
                print(f"warning: {name} could not finish its run ({type(err).__name__}: {err})", file=sys.stderr,
                      flush=True)

    # --- the Trainer's events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.open(self.step_offset + state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        from transformers.integrations.integration_utils import rewrite_logs

        if state.is_world_process_zero and logs:
            self.log(rewrite_logs(logs), self.step_offset + state.global_step)


def attach(trainer, callback: TrackingCallback | None = None) -> TrackingCallback:
    """Swap ``trainer``'s transformers callbacks for tensorboard, trackio and wandb for ``callback`` (the run's, shared
    by its Trainers), or for the one it already has, or a new one on its args; returns it."""
    from transformers.integrations.integration_utils import TensorBoardCallback, TrackioCallback, WandbCallback

    handler = trainer.callback_handler
    present = [cb for cb in handler.callbacks if isinstance(cb, TrackingCallback)]
    callback = callback or (present[0] if present else TrackingCallback(trainer.args))
    for cb in list(handler.callbacks):
        if isinstance(cb, (TensorBoardCallback, TrackioCallback, WandbCallback)) or (
                isinstance(cb, TrackingCallback) and cb is not callback):
            handler.remove_callback(cb)
    if callback not in handler.callbacks:  # first: the console printer pops total_flos from the logs it is shown
        handler.callbacks.insert(0, callback)
    return callback


def log_table(trainer, key: str, columns: list[str], rows: list[list], step: int) -> None:
    """``rows`` as table ``key`` at ``trainer``'s step ``step``, to the trackers :func:`attach` gave it (main process;
    nothing when it has none)."""
    if not trainer.is_world_process_zero():
        return
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TrackingCallback):
            cb.table(key, columns, rows, cb.step_offset + step)
