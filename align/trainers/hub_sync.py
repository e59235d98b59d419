"""transformers' Trainer never pushes or creates a repository in align: :class:`NoTrainerPush`, mixed in before it in
every align trainer, turns its three push paths off (``init_hf_repo`` at construction, ``push_to_hub`` from
``save_model``, ``_push_from_checkpoint`` per checkpoint). They pushed before the final evaluation, uploaded the
reference caches and pickled arguments, and failed offline after the model had loaded; align pushes once, at the end
(:func:`align.hub.push_run`). With ``hub_strategy: every_save``, :class:`CheckpointUploads` hands each published
checkpoint to the run's background uploader (:func:`align.hub.upload_in_background`).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from align.hub import checkpoint_files, target_of, upload_in_background


class CheckpointUploads(TrainerCallback):
    """``every_save``: after each checkpoint is complete and renamed into place, queue its upload (main process)."""

    def __init__(self, config):
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        upload_in_background(args.output_dir, target_of(self.config), os.path.basename(folder),
                             lambda: checkpoint_files(folder) if os.path.isdir(folder) else {})


class NoTrainerPush:
    """Mix in before ``transformers.Trainer``: its own pushes never happen; ``every_save`` uploads go through
    :class:`CheckpointUploads`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        if self.args.push_to_hub and strategy == "every_save":
            self.add_callback(CheckpointUploads(self.args))

    def init_hf_repo(self, token: str | None = None) -> None:
        """Nothing: align creates the repository when it pushes."""

    def push_to_hub(self, *args, **kwargs) -> None:
        """Nothing: align pushes the whole run at its end (:func:`align.hub.push_run`, or ``align push``)."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Nothing: checkpoints are uploaded once complete (:class:`CheckpointUploads`)."""


def without_trainer_push(trainer_class: type) -> type:
    """``trainer_class`` (e.g. TRL's ``SFTTrainer``) with :class:`NoTrainerPush` mixed in."""
    return type(trainer_class.__name__, (NoTrainerPush, trainer_class), {})
