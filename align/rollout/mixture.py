"""Sampling from a geometric mixture of the policy and a reference: π_θ^{1−c} · π_ref^{c}, token by token.

At every step the next-token log-probs are ``(1 − c)·log π_θ(·|x, y_<t) + c·log π_ref(·|x, y_<t)``, normalised
(as TRL's ``GeometricMixtureWrapper`` does for Nash-MD and EGPO's mixture sampling; docs/methods.md §6). It is a
token-level stand-in for the sequence-level mixture. ``c = 0`` samples the policy and ``c = 1`` the reference,
with the same per-completion random streams as :class:`~align.rollout.hf.HFEngine`.
"""

from __future__ import annotations

import inspect

import torch

from align.rollout.hf import HFEngine


class _ReferenceMixer:
    """A logits processor: mixes the policy's next-token log-probs with the reference model's, which it runs
    incrementally (its own KV cache) on the same left-padded batch. Keeps nothing per step: the sampler after it
    records the sampled token's mixed log-prob."""

    def __init__(self, ref_model, coef: float, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.ref, self.coef = ref_model, coef
        self.prompt_mask = attention_mask
        self.width = input_ids.shape[1]
        self.past = None
        self.seen = 0
        self.keeps_logits = "logits_to_keep" in inspect.signature(ref_model.forward).parameters

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, length = input_ids.shape
        ones = torch.ones((rows, length - self.width), dtype=self.prompt_mask.dtype, device=input_ids.device)
        mask = torch.cat([self.prompt_mask, ones], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if self.keeps_logits else {}  # the prompt's logits are never needed
        out = self.ref(input_ids=input_ids[:, self.seen:], attention_mask=mask, position_ids=positions[:, self.seen:],
                       past_key_values=self.past, use_cache=True, **keep)
        self.past, self.seen = out.past_key_values, length
        mixed = (1 - self.coef) * scores.float().log_softmax(-1) + self.coef * out.logits[:, -1].float().log_softmax(-1)
        return mixed.log_softmax(-1)


class MixtureEngine(HFEngine):
    """:class:`HFEngine` sampling from the geometric mixture of ``model`` and ``ref_model`` with weight ``coef`` on
    the reference. The returned sampling log-probs are the mixture's (tempered and cut like HFEngine's)."""

    def __init__(self, model, ref_model, tokenizer, coef: float, batch_size: int = 64):
        if not 0.0 <= coef <= 1.0:
            raise ValueError(f"mixture_coef: must be in [0, 1], got {coef}")
        super().__init__(model, tokenizer, batch_size)
        self.ref_model, self.coef = ref_model, coef

    def extra_processors(self, input_ids, attention_mask) -> list:
        return [_ReferenceMixer(self.ref_model, self.coef, input_ids, attention_mask)]
