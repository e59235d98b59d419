"""The one base of align's trainers: LoRA wrapping, the frozen reference, the rollout engine, resume state, the
non-finite-loss stop.

Each piece is one method (or function) so that a change to how it works (sharding, a new weight sync) is made
once, for every trainer:

* :func:`wrap_peft`: the LoRA adapter, its random init seeded by the run's seed;
* :meth:`AlignTrainer.setup_reference` / :meth:`AlignTrainer.reference`: the frozen reference model, or the
  policy with its adapter off;
* :meth:`AlignTrainer.setup_rollout`: the rollout engine and the weight sync that keeps it on the policy;
* checkpoints and resume state: every checkpoint is staged and renamed when complete
  (:class:`align.checkpoints.AtomicCheckpoints`); a trainer with a ``state_file`` returns its counters from
  :meth:`AlignTrainer.resume_state`, written into each checkpoint before the rename, and
  ``train(resume_from_checkpoint=...)`` hands them back to :meth:`AlignTrainer.load_resume_state` (a checkpoint
  without them is refused);
* :meth:`AlignTrainer.check_finite`: the one-line error that stops a run before a non-finite update;
* :class:`RolloutTrainer`: the trainers whose batches are prompt rows answered by a rollout engine (RL, online):
  each global prompt batch serves several optimizer steps (:class:`RepeatRoundSampler`).
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext

import torch
from transformers import Trainer, TrainerCallback

from align import fsdp2, progress, zero3
from align.checkpoints import AtomicCheckpoints, check_checkpoint, resolve_resume
from align.data.prompts import tokenize_prompts
from align.errors import TrainingError
from align.io import atomic_write_json
from align.modeling import pad_token_id
from align.rollout import WeightSync, build_engine
from align.rollout.collective import has_shards
from align.rollout.vllm_engine import mergeable_layers
from align.sharding import broadcast_from_rank0, check_in_effect
from align.stopping import StopCallback
from align.trainers.hub_sync import NoTrainerPush
from align.trainers.metric_log import MetricsMixin


def wrap_peft(model, peft_config, seed: int):
    """``model`` with a LoRA adapter from ``peft_config`` (``model`` itself when None); the adapter's random init
    follows the run's seed."""
    if peft_config is None:
        return model
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(model, peft_config)


def rows_collator(batch: list[dict]) -> dict:
    """The prompt rows themselves, uncollated: the trainer generates from them."""
    return {"rows": batch}


class RepeatRoundSampler(torch.utils.data.Sampler):
    """Shuffled prompt indices, each global prompt batch repeated once per optimizer step of its round, so
    every process's dataloader hands it the same prompts for the whole round (incomplete batches dropped)."""

    def __init__(self, num_rows: int, global_batch: int, repeats: int, seed: int):
        self.num_rows, self.global_batch, self.repeats, self.seed, self.epoch = num_rows, global_batch, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_rows // self.global_batch) * self.global_batch * self.repeats

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for s in range(0, self.num_rows - self.global_batch + 1, self.global_batch):
            for _ in range(self.repeats):
                yield from order[s : s + self.global_batch]


class AlignTrainer(NoTrainerPush, MetricsMixin, fsdp2.FSDP2Checkpoints, AtomicCheckpoints, Trainer):
    """``transformers.Trainer`` with the set-up every align trainer shares (it never pushes to the Hub itself:
    :mod:`align.trainers.hub_sync`). Subclasses wrap the model with
    :func:`wrap_peft` first, then call this ``__init__`` (the ``Trainer``'s arguments), then set up what they
    need: :meth:`setup_reference`, :meth:`setup_rollout`."""

    state_file: str | None = None  # file name of the resume state in each checkpoint; None: nothing to keep
    fsdp2_supported = False  # whether align shards this trainer's policy itself under an FSDP config (align/fsdp2.py)
    fsdp2_reference_copy = False  # under it, whether setup_reference may need a frozen copy of the initial policy

    def wants_reference_copy(self, args) -> bool:
        """Under align's FSDP2: whether :meth:`setup_reference` will copy the initial policy (the copy is taken whole
        before the policy is sharded, then sharded too)."""
        return self.fsdp2_reference_copy

    def __init__(self, model, args, **trainer_kwargs):
        self.fsdp2 = fsdp2.wanted(args, type(self))
        self._fsdp2_reference_source = None
        if self.fsdp2:  # before any pass reads the policy and before the Trainer builds the optimizer on it
            if self.wants_reference_copy(args):  # the frozen reference: copied whole now, sharded by setup_reference
                self._fsdp2_reference_source = copy.deepcopy(model)
            if hasattr(model, "disable_adapter"):  # LoRA: each process initialised its own adapter; rank 0's for all
                broadcast_from_rank0([p for p in model.parameters() if p.requires_grad])
            model = fsdp2.shard(model, fsdp2.reshard_after_forward(args))
            print(fsdp2.describe(model), flush=True)
        zero3.reuse_plugin(args)  # a later Trainer in a DeepSpeed process (the iterative driver's rounds)
        super().__init__(model=model, args=args, **trainer_kwargs)
        if self.fsdp2:  # the Trainer's path for a model that owns its sharding: prepared without DDP
            self.is_distributed_loading_by_transformers = True
        check_in_effect(args, self.accelerator)  # FSDP / DeepSpeed asked for is in effect, not a quiet DDP run
        self.is_peft = hasattr(model, "disable_adapter")
        self.ref_model = None
        self.engine = None
        self.weight_sync = None
        self._init_metrics()
        self.add_callback(StopCallback(self))  # SIGTERM / SIGINT: a checkpoint at the step's end, then stop
        self.add_callback(EngineCallback(self))  # DeepSpeed: the engine known to align.zero3, and said

    @property
    def policy(self):
        """The policy being trained, unwrapped from any distributed wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # --- the frozen reference ---------------------------------------------------------------------

    def setup_reference(self, ref_model=None, needed: bool = True) -> None:
        """``self.ref_model``: ``ref_model`` if given; else, when ``needed`` and the policy has no LoRA adapter to
        switch off, a frozen copy of the initial policy; else None. Frozen, in eval mode, on the device."""
        source, self._fsdp2_reference_source = self._fsdp2_reference_source, None
        if ref_model is None and needed and not self.is_peft and self.fsdp2:
            if source is None:  # wants_reference_copy said no copy would be needed: a trainer's bug
                raise TrainingError("a frozen copy of the policy cannot be made from its FSDP2 shards; precompute "
                                    "the reference log-probs or pass ref_model")
            self.ref_model = fsdp2.shard(source.requires_grad_(False), fsdp2.reshard_after_forward(self.args)).eval()
            return  # sharded like the policy, frozen: its forwards run in step on every process, or gathered
        if ref_model is None and needed and not self.is_peft:  # ZeRO-3: the partitions copied (align/zero3.py)
            ref_model = zero3.partitioned_copy(self.model) if zero3.is_partitioned(self.model) else copy.deepcopy(
                self.model)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval().to(self.args.device)
        self.ref_model = ref_model

    def reference(self):
        """(model, context) that computes or samples the reference policy: the frozen ``ref_model``, else the
        policy with its LoRA adapter off, else (only before training moves it) the policy itself."""
        if self.ref_model is not None:  # ZeRO-3: the partitioned reference gathered whole for the pass
            return self.ref_model, zero3.gathered(self.ref_model)
        policy = self.policy
        return policy, (policy.disable_adapter() if self.is_peft else nullcontext())

    # --- rollout ----------------------------------------------------------------------------------

    def setup_rollout(self, engine=None) -> None:
        """``self.engine`` (``engine``, or the one ``args.rollout`` names) and ``self.weight_sync``, which pushes
        the policy's weights to it before a generation when it holds its own copy."""
        args = self.args
        if (args.rollout != "hf" and self.is_peft and not args.vllm_lora_adapter
                and has_shards(self.policy)):  # merged pushes from shards: what cannot merge, now, not at the push
            mergeable_layers(self.policy)
        self.engine = engine or build_engine(args, self.model, self.processing_class,
                                             is_main=self.accelerator.is_main_process)
        self.weight_sync = WeightSync(self.engine, args.rollout, args.vllm_sync_steps, self.accelerator,
                                      show=progress.shown(args, self.accelerator.is_main_process))

    def close(self) -> None:
        """Release the rollout engine (a colocated vLLM's memory); the trainer cannot generate after this."""
        if self.engine is not None:
            self.engine.close()

    # --- state kept across resume -----------------------------------------------------------------

    def resume_state(self) -> dict:
        """What a resumed run needs beyond the Trainer's own checkpoint (JSON-serialisable)."""
        raise NotImplementedError(f"{type(self).__name__} sets state_file but not resume_state()")

    def load_resume_state(self, state: dict) -> None:
        """Restore what :meth:`resume_state` returned."""
        raise NotImplementedError(f"{type(self).__name__} sets state_file but not load_resume_state()")

    def save_checkpoint_extras(self, folder: str) -> None:
        if self.state_file is not None:
            atomic_write_json(os.path.join(folder, self.state_file), self.resume_state())

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest complete checkpoint in ``output_dir``,
        and a checkpoint to resume must be complete, with this trainer's ``state_file`` (ConfigError otherwise)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = resolve_resume(self.args.output_dir, self.state_file,
                                                    announce=self.is_world_process_zero())
        if isinstance(resume_from_checkpoint, str):
            check_checkpoint(resume_from_checkpoint, self.state_file)
            if self.state_file is not None:
                with open(os.path.join(resume_from_checkpoint, self.state_file), encoding="utf-8") as fh:
                    self.load_resume_state(json.load(fh))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # --- the non-finite-loss stop -----------------------------------------------------------------

    def check_finite(self, loss: torch.Tensor, what: str = "loss", detail: str = "") -> None:
        """Stop before the update when ``loss`` is NaN or infinite: a one-line :class:`TrainingError` naming the
        step (``detail``, e.g. ", batch rows [...]", follows it)."""
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite {what} ({loss.item()}) at step {self.state.global_step + 1}{detail}; "
                                f"stopped before the update, checkpoints already in {self.args.output_dir!r} are kept")


class EngineCallback(TrainerCallback):
    """Once ``prepare`` has built a DeepSpeed engine: the module learns its engine (:func:`align.zero3.gathered`
    turns its hooks off) and each process says how it holds the model (:func:`align.zero3.describe`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        if getattr(self.trainer, "is_deepspeed_enabled", False) and hasattr(engine, "zero_optimization_stage"):
            zero3.remember_engine(engine)
            print(zero3.describe(engine), flush=True)


class RolloutTrainer(AlignTrainer):
    """Base of the trainers whose batches are prompt rows answered by a rollout engine (RL, online): prompts are
    tokenised when they are not yet, each global prompt batch serves :attr:`batch_repeats` optimizer steps, and
    the Trainer's FLOP count (meaningless here) is skipped."""

    batch_unit = "step"  # what one prompt batch is called in the too-small-dataset error
    batch_repeats = 1  # optimizer steps each global prompt batch serves

    def __init__(self, model, args, train_dataset, eval_dataset=None, processing_class=None, callbacks=None):
        tok = processing_class
        if "prompt_ids" not in train_dataset.column_names:
            train_dataset = tokenize_prompts(train_dataset, tok, args.max_prompt_length, "train")
        if eval_dataset is not None and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = tokenize_prompts(eval_dataset, tok, args.max_prompt_length, "eval")
        super().__init__(model, args, data_collator=rows_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tok, callbacks=callbacks)
        need = args.per_device_train_batch_size * self.accelerator.num_processes
        if len(train_dataset) < need:
            raise TrainingError(f"train dataset: {len(train_dataset)} prompts, fewer than one {self.batch_unit} needs "
                                f"(per_device_train_batch_size x processes = {need})")
        self.pad_id = pad_token_id(tok)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        batch = self.args.per_device_train_batch_size * self.accelerator.num_processes
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return RepeatRoundSampler(len(ds), batch, self.batch_repeats, seed)

    def floating_point_ops(self, inputs) -> int:
        return 0
