"""Trainers: thin ``transformers.Trainer`` subclasses; the objectives live in :mod:`align.objectives`."""

from align.trainers.preference import PreferenceConfig, PreferenceTrainer

__all__ = ["PreferenceConfig", "PreferenceTrainer"]
