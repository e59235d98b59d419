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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from align.args import world_size
from align.config import config_help, load_config, to_dict
from align.errors import AlignError, ConfigError
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
    """Parse, validate and run; a bad input ends with ``error: <one line>`` and status 2, a SIGTERM / SIGINT with
    a clean stop (:mod:`align.stopping`), one line and status 128 + the signal's number."""
    with signals_handled():
        try:  # the outer try also catches a signal that arrives while an error is being printed
            code = 0
            try:
                config = parse(recipe, sys.argv[1:] if argv is None else argv)
                recipe.run(config)
            except AlignError as err:
                print(f"error: {err}", file=sys.stderr)
                code = 2
        except Stopped as stop:
            code = stop.report()
    _end_processes(code)
    return code


def _end_processes(code: int) -> None:
    """Under ``accelerate launch`` (a process group is up): wait for every rank (after a clean run), tear the group
    down, flush, and leave with ``os._exit``. A rank left to ordinary interpreter shutdown sometimes aborted after
    its run had finished and saved (``terminate called without an active exception``, status -6: a C++ thread
    still joinable at exit), turning a good run red at random; everything is written and closed by here."""
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
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
    """Write the resolved config next to the outputs (main process only, atomically)."""
    path = os.path.join(config.output_dir, "align_config.yaml")
    if is_main_process():
        with atomic_open(path) as fh:
            yaml.safe_dump(to_dict(config), fh, sort_keys=True)
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
    is an eval dataset; returns the output folder and every metric (plus ``extra``). A run stopped by a signal
    raises :class:`align.stopping.Stopped` instead: in the loop, with its checkpoint; after it, once the final model
    is saved."""
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
        if hasattr(trainer, "close"):  # a rollout engine with its own memory (vLLM)
            trainer.close()
    return {"output_dir": os.path.abspath(config.output_dir), **metrics, **{k: v() for k, v in extra.items()}}
