"""What every recipe shares: discovery by name, the command line, and run bookkeeping.

A recipe is a module in the top-level ``recipes`` package that defines ``RECIPE = Recipe(...)``. The
same entry point serves ``align train <name> --config x.yaml k=v`` and
``accelerate launch recipes/<name>.py --config x.yaml k=v``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from align.args import world_size
from align.config import config_help, load_config, to_dict
from align.errors import AlignError, ConfigError, print_error
from align.io import atomic_open
from align.shipped import resolve_config
from align.stopping import Stopped, after_train, signals_handled, stop_point


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    config_class: type
    run: Callable[[Any], dict]


def discover() -> dict[str, Recipe]:
    """Every recipe module in the ``recipes`` package, by name."""
    import align.recipes

    found = {}
    for info in pkgutil.iter_modules(align.recipes.__path__):
        module = importlib.import_module(f"align.recipes.{info.name}")
        recipe = getattr(module, "RECIPE", None)
        if isinstance(recipe, Recipe):
            found[recipe.name] = recipe
    return dict(sorted(found.items()))


def get_recipe(name: str) -> Recipe:
    found = discover()
    if name not in found:
        raise ConfigError(f"unknown recipe {name!r} (available: {', '.join(found)})")
    return found[name]


def parse(recipe: Recipe, argv: Sequence[str]):
    """The recipe's config from ``--config PATH`` and overrides in ``argv`` (``--help`` lists every key, grouped by
    config part, wrapped to the terminal's width)."""
    width = shutil.get_terminal_size().columns
    summary = "\n\n".join(textwrap.fill(p, width - 2, break_on_hyphens=False) for p in (
        recipe.summary, "Overrides: key=value or --key value, after or instead of --config."))
    parser = argparse.ArgumentParser(
        prog=f"align train {recipe.name}",
        description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("--config", help="YAML file of key: value pairs")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(list(argv))
    if args.help:
        parser.print_help()
        print("\nConfig keys, by part:\n\n" + config_help(recipe.config_class, width))
        raise SystemExit(0)
    return load_config(recipe.config_class, resolve_config(recipe.name, args.config), rest)


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Parse, validate and run, then :func:`finish_run` on the main process; a bad input ends with
    ``error: <one line>`` and status 2, a SIGTERM / SIGINT with a clean stop (:mod:`align.stopping`), one line and
    status 128 + the signal's number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed = False
    with signals_handled():
        try:  # the outer try also catches a signal that arrives while an error is being printed
            code = 0
            try:
                config = parse(recipe, argv)
                started = time.monotonic()
                result = recipe.run(config)
                wall_time_s = time.monotonic() - started
                distributed = _leave_group(barrier=True)  # every rank is done: a long push keeps no rank waiting
                if is_main_process():
                    from align.run_info import run_info

                    finish_run(config.output_dir, config, result, run_info(recipe.name, argv, config, result,
                                                                           wall_time_s))
            except AlignError as err:
                print_error(err)
                code = 2
        except Stopped as stop:
            code = stop.report()
    _end_processes(code, distributed)
    return code


def finish_run(output_dir: str, config, result: dict, run_info: dict) -> str | None:
    """The end of every run, on the main process, once the final model is saved and evaluated: the plots
    (:func:`align.plots.write_plots`), the model card (:func:`align.card.write_model_card`) and, with
    ``push_to_hub``, the push (:func:`align.hub.push_run`; its :class:`~align.errors.HubError` propagates). A plot or
    card that fails costs one warning line, never the trained model. Returns the push's commit URL, if any."""
    from align.card import write_model_card
    from align.plots import write_plots

    for what, write in (("plots", lambda: write_plots(output_dir)),
                        ("model card", lambda: write_model_card(output_dir, config, result, run_info))):
        try:
            write()
        except Exception as err:  # noqa: BLE001 -- the model is saved; a broken figure or card must not fail the run
            print(f"warning: the {what} of {output_dir!r} could not be written ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:200]}); the trained model is saved", file=sys.stderr, flush=True)
    if getattr(config, "push_to_hub", False):
        from align.hub import push_run

        return push_run(output_dir, config)
    return None


def _leave_group(barrier: bool) -> bool:
    """Under ``accelerate launch`` (a process group is up): wait for every rank when ``barrier``, then tear the group
    down; returns whether there was one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    return True


def _end_processes(code: int, distributed: bool = False) -> None:
    """A process of a process group (up still, or already left after a clean run: ``distributed``) tears it down
    after waiting for every rank (after a clean run), flushes, and leaves with ``os._exit``. A rank left to ordinary
    interpreter shutdown sometimes aborted after its run had finished and saved (``terminate called without an
    active exception``, status -6: a C++ thread still joinable at exit), turning a good run red at random;
    everything is written and closed by here."""
    import logging

    if not (_leave_group(barrier=code == 0) or distributed):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def describe_batch(config) -> str:
    """The effective batch, spelled out from the three knobs that make it."""
    per, accum, procs = config.per_device_train_batch_size, config.gradient_accumulation_steps, world_size()
    return (f"effective batch = per_device_train_batch_size {per} x gradient_accumulation_steps {accum} "
            f"x processes {procs} = {per * accum * procs} sequences per optimizer step")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def save_config(config) -> str:
    """Write the resolved config next to the outputs (main process only, atomically), without its secrets
    (``hub_token``, ...: :func:`align.hub_args.public_config`)."""
    from align.hub_args import public_config

    path = os.path.join(config.output_dir, "align_config.yaml")
    if is_main_process():
        with atomic_open(path) as fh:
            yaml.safe_dump(public_config(to_dict(config)), fh, sort_keys=True)
    return path


def start(config) -> list:
    """Bookkeeping at the start of every run: print the batch, save the config, return the callbacks."""
    from align.metrics import JsonlMetricsCallback

    clear = getattr(config, "clear_previous_run", None)  # overwrite_output_dir: only now that every check passed
    if clear is not None:
        clear()
    if is_main_process():
        describe = getattr(config, "describe", None)  # RL configs spell out their round instead
        print(describe(world_size()) if describe else describe_batch(config), flush=True)
    save_config(config)
    return [JsonlMetricsCallback(os.path.join(config.output_dir, config.metrics_file))]


def train_and_save(trainer, config, **extra) -> dict:
    """Train (resuming when the config says so), save the final model to ``output_dir``, evaluate when there
    is an eval dataset; returns the output folder, every metric (plus ``extra``) and the datasets' ``rows``
    (:func:`row_counts`). A run stopped by a signal raises :class:`align.stopping.Stopped` instead: in the loop,
    with its checkpoint; after it, once the final model is saved. The ``report_to`` trackers are one run, the
    evaluation included (:func:`align.tracking.attach`), closed at the end."""
    from align.tracking import attach

    tracking = attach(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        after_train(trainer)  # stopped by a signal: the checkpoint is the output, no final save or evaluation
        trainer.save_model(config.output_dir)
        stop_point(f"after training, with the final model saved in {config.output_dir}", trainer.args.device,
                   trainer.is_world_process_zero())
        metrics = {**result.metrics}
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
    finally:
        tracking.close()
        if hasattr(trainer, "close"):  # a rollout engine with its own memory (vLLM)
            trainer.close()
    return {"output_dir": os.path.abspath(config.output_dir), **metrics, **{k: v() for k, v in extra.items()},
            "rows": row_counts(trainer.train_dataset, trainer.eval_dataset)}


def row_counts(train, evaluation=None) -> dict:
    """The rows of the train and eval datasets a run used (None where unknown), for the model card."""
    def rows(ds):
        try:
            return len(ds)
        except TypeError:  # an iterable dataset
            return None

    return {"train": rows(train), "eval": None if evaluation is None else rows(evaluation)}
