"""Trainers: ``transformers.Trainer`` subclasses on one base (:mod:`align.trainers.base`: LoRA, reference, rollout
engine, resume state); the objectives live in :mod:`align.objectives`."""

from align.trainers.preference import PreferenceConfig, PreferenceTrainer

__all__ = ["PreferenceConfig", "PreferenceTrainer"]
