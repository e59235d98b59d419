"""Checkpoints that are complete or absent: staging, the completeness rule, the newest complete checkpoint.

``transformers.Trainer`` writes ``checkpoint-N`` in place, file by file, so a kill during a save leaves a folder
that looks like a checkpoint and is not. Every align trainer (:class:`AtomicCheckpoints`) writes it into the staging
folder ``.checkpoint-N.tmp/checkpoint-N`` instead: the model, optimizer, scheduler, RNG states (one file per
process), ``trainer_state.json`` and the trainer's own resume state (``rl_state.json``, ...); once every process
has written its part, the saving process renames it to ``checkpoint-N`` in one ``os.replace``. A ``checkpoint-N``
folder is therefore whole or absent; a staging folder left by a kill is ignored and removed later (only our
``.checkpoint-N.tmp`` names are ever removed).

Resume takes the newest *complete* checkpoint (:func:`resolve_resume`) and says which in one line, naming the
newer incomplete ones it skipped (left by an older version of align or another tool). Complete means: it holds
``trainer_state.json``, the model weights and, when the trainer keeps a resume state, that file
(:func:`missing_parts`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil

from align.errors import ConfigError

TRAINER_STATE = "trainer_state.json"
# Any one of these makes the model part of a checkpoint (full model, sharded, LoRA adapter).
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
           "adapter_model.safetensors", "adapter_model.bin")
FSDP_WEIGHTS = "pytorch_model_fsdp"  # FSDP's own files / folders (pytorch_model_fsdp_0, ...)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = re.compile(r"^\.checkpoint-(\d+)\.tmp$")


def staging_dir(run_dir: str, step: int) -> str:
    """The staging folder of step ``step``'s checkpoint (it holds ``checkpoint-<step>`` while that is written)."""
    return os.path.join(run_dir, f".checkpoint-{step}.tmp")


def missing_parts(folder: str, state_file: str | None = None) -> list[str]:
    """What a complete checkpoint holds that ``folder`` lacks: ``trainer_state.json``, ``model weights``, and
    ``state_file`` when given; empty when complete."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    missing = [] if TRAINER_STATE in names else [TRAINER_STATE]
    if not names.intersection(WEIGHTS) and not any(n.startswith(FSDP_WEIGHTS) for n in names):
        missing.append("model weights")
    if state_file and state_file not in names:
        missing.append(state_file)
    return missing


def check_checkpoint(folder: str, state_file: str | None = None) -> None:
    """ConfigError (one line, naming the folder and what it lacks) unless ``folder`` is a complete checkpoint."""
    if not os.path.isdir(folder):
        raise ConfigError(f"resume_from_checkpoint: folder {folder!r} does not exist")
    lacks = missing_parts(folder, state_file)
    if lacks:
        why = ("; the trainer's resume state (counters, prompt statistics) would restart from zero: resume from a "
               "checkpoint saved with it, or start afresh" if state_file in lacks else "")
        raise ConfigError(f"resume_from_checkpoint: {folder!r} is not a complete checkpoint, it has no "
                          f"{' and no '.join(lacks)}{why}")


def checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders in ``run_dir``, oldest (lowest N) first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := CHECKPOINT.match(n))
             and os.path.isdir(os.path.join(run_dir, n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found)]


def newest_complete(run_dir: str, state_file: str | None = None) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The newest complete checkpoint in ``run_dir`` (None if there is none) and the newer incomplete ones skipped
    on the way, each with what it lacks."""
    skipped = []
    for folder in reversed(checkpoints(run_dir)):
        lacks = missing_parts(folder, state_file)
        if not lacks:
            return folder, skipped
        skipped.append((folder, lacks))
    return None, skipped


def resolve_resume(run_dir: str, state_file: str | None = None, announce: bool = True) -> str:
    """The checkpoint ``resume_from_checkpoint=true`` resumes: the newest complete one in ``run_dir``, announced in
    one line (with the incomplete ones skipped); ConfigError when there is none."""
    last, skipped = newest_complete(run_dir, state_file)
    skips = "; ".join(f"{os.path.basename(f)} (no {' and no '.join(lacks)})" for f, lacks in skipped)
    if last is None and not skipped:
        raise ConfigError(f"resume_from_checkpoint: no checkpoint-* folder in output_dir {run_dir!r}")
    if last is None:
        raise ConfigError(f"resume_from_checkpoint: no complete checkpoint-* folder in output_dir {run_dir!r} "
                          f"(incomplete: {skips})")
    if announce:
        print(f"resuming from {last}" + (f", skipping incomplete {skips}" if skipped else ""), flush=True)
    return last


def remove_staging(run_dir: str) -> None:
    """Remove the staging folders (``.checkpoint-N.tmp``) that killed saves left in ``run_dir``."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        if STAGING.match(name):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def remove_checkpoints(run_dir: str) -> list[str]:
    """Delete the previous run's checkpoints in ``run_dir`` so that no later resume continues it: every
    ``checkpoint-N`` folder that is recognisably a checkpoint (holds ``trainer_state.json``), and our staging
    leftovers. Returns the names removed; other folders are left alone."""
    removed = []
    for folder in checkpoints(run_dir):
        if os.path.isfile(os.path.join(folder, TRAINER_STATE)):
            shutil.rmtree(folder)
            removed.append(os.path.basename(folder))
    remove_staging(run_dir)
    return removed


def publish(staged: str, final: str) -> None:
    """Rename the complete checkpoint ``staged`` (inside its staging folder) to ``final``; a folder already at
    ``final`` (the same step saved before) is moved into the staging folder first and removed with it."""
    stage = os.path.dirname(staged)
    if os.path.lexists(final):
        os.replace(final, os.path.join(stage, "replaced"))
    os.replace(staged, final)
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename durable where the filesystem allows it
        fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpoints:
    """Mix into a ``transformers.Trainer`` subclass, before the Trainer: every checkpoint is staged and renamed
    when complete (module docstring). :meth:`save_checkpoint_extras` writes a trainer's own files into the staged
    folder before the rename. ``save_total_limit`` rotation runs on the published checkpoints."""

    _checkpoint_stage: str | None = None  # while a checkpoint is written: the folder the Trainer writes it under

    def save_checkpoint_extras(self, folder: str) -> None:
        """Write what the trainer keeps beyond the Trainer's own checkpoint into ``folder`` (saving process only)."""

    def _get_output_dir(self, trial):
        return self._checkpoint_stage or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        stage = staging_dir(run_dir, self.state.global_step)
        staged, final = os.path.join(stage, name), os.path.join(run_dir, name)
        saver = self.args.should_save
        if saver:  # a leftover of a killed save of this same step
            shutil.rmtree(stage, ignore_errors=True)
            os.makedirs(stage)
        self.accelerator.wait_for_everyone()
        self._checkpoint_stage = stage
        try:
            super()._save_checkpoint(model, trial)  # writes stage/checkpoint-N, every process its part
        finally:
            self._checkpoint_stage = None
        if self.state.best_model_checkpoint == staged:  # the best checkpoint is this one: name its final place
            self.state.best_model_checkpoint = final
            if saver:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        if saver:
            self.save_checkpoint_extras(staged)
        self.accelerator.wait_for_everyone()  # every process's files are in
        if saver:
            publish(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def with_atomic_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass, e.g. TRL's ``SFTTrainer``) with
    :class:`AtomicCheckpoints` mixed in."""
    return type(trainer_class.__name__, (AtomicCheckpoints, trainer_class), {})


def clear_previous_run(config) -> None:
    """``overwrite_output_dir`` (not resuming): remove the previous run's checkpoints and metrics file from
    ``config.output_dir``, so that no later resume continues that run. Called by :func:`align.recipe.start` once
    every check has passed and the model has loaded, so a refused config never costs the user a checkpoint. Main
    process only."""
    out = config.output_dir
    if (not config.overwrite_output_dir or config.resume_from_checkpoint or not os.path.isdir(out)
            or os.environ.get("RANK", "0") != "0"):
        return
    removed = remove_checkpoints(out)
    metrics = os.path.join(out, config.metrics_file)
    if os.path.dirname(os.path.abspath(metrics)) == os.path.abspath(out) and os.path.isfile(metrics):
        os.remove(metrics)
        removed.append(config.metrics_file)
    if removed:
        print(f"overwrite_output_dir: removed the previous run's {', '.join(removed)} from {out!r}", flush=True)
