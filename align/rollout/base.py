"""The rollout-engine protocol: what every engine (HF generate, a colocated vLLM, `align serve`) gives.

    engine.generate(prompts, n_per_prompt, sampling) -> Rollouts

``prompts`` are tokenised prompts (lists of token ids, no padding); ``n_per_prompt[i]`` completions are
drawn for prompt ``i`` (0 is allowed: the prompt is skipped), so groups can be ragged. Completions come
back prompt-major (every completion of prompt 0, then of prompt 1, ...), each with its token ids, its
finish reason (``"stop"`` at end-of-sequence, ``"length"`` when cut at ``max_new_tokens``) and the
per-token log-probs of the sampling distribution (for importance-sampling corrections when the sampler
and the trainer disagree, as vLLM and the trainer do). The HF engine returns the log-probs of the tempered, cut
distribution it sampled from; the vLLM engines return the engine model's raw log-probs (temperature 1, no
cut), which is what the trainer's own log-probs are comparable with.

Determinism: completion ``k`` of a prompt with key ``key`` is drawn from its own random stream seeded by
``(sampling.seed, key, k)``, so it does not depend on which other prompts share the batch, on the batch
size, or on which process generates it. ``keys`` default to the prompts' positions.

Engines that hold their own copy of the weights (vLLM) implement ``sync_weights(model)``; the trainer
calls it before a generation once ``vllm_sync_steps`` optimizer steps have passed since the last call
(:class:`align.rollout.sync.WeightSync`); the HF engine generates with the live model and copies nothing.
``generate`` is synchronous; an asynchronous engine can return as soon as results are ready behind the same
call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy (then ``seed`` does not matter)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")


@dataclass
class Rollouts:
    """Completions of one ``generate`` call, prompt-major. All lists have one entry per completion."""

    prompt_index: list[int] = field(default_factory=list)  # index into the ``prompts`` passed in
    sample_index: list[int] = field(default_factory=list)  # k: which sample of its prompt
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)  # up to and including eos, no padding
    finish_reason: list[str] = field(default_factory=list)
    sampling_logps: list[list[float]] = field(default_factory=list)  # one per completion token

    def __len__(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], n_per_prompt: Sequence[int], sampling: SamplingParams,
                 keys: Sequence[int | str] | None = None) -> Rollouts: ...

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


def sample_seed(seed: int, key, k: int) -> int:
    """The seed of completion ``k`` of the prompt with ``key``: a stable 63-bit hash (not Python's ``hash``,
    which changes between processes)."""
    digest = hashlib.blake2b(f"{seed}|{key}|{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_request(prompts: Sequence[Sequence[int]], n_per_prompt: Sequence[int], keys) -> list:
    if len(prompts) != len(n_per_prompt):
        raise ValueError(f"n_per_prompt: {len(n_per_prompt)} counts for {len(prompts)} prompts")
    if any(n < 0 for n in n_per_prompt):
        raise ValueError("n_per_prompt: counts must be >= 0")
    if keys is None:
        return list(range(len(prompts)))
    if len(keys) != len(prompts):
        raise ValueError(f"keys: {len(keys)} keys for {len(prompts)} prompts")
    return list(keys)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the model's generation-config eos ids plus the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("the tokenizer and the model's generation config name no eos token")
    return eos
