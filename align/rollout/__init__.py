"""Rollout engines behind one protocol: ``generate(prompts, n_per_prompt, sampling) -> Rollouts``."""

from align.rollout.base import RolloutEngine, Rollouts, SamplingParams, sample_seed
from align.rollout.hf import HFEngine

__all__ = ["HFEngine", "RolloutEngine", "Rollouts", "SamplingParams", "sample_seed"]
