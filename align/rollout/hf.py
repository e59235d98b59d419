"""Rollouts with ``transformers`` ``generate``: batched, left-padded, one random stream per completion.

Sampling uses the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g`` standard Gumbel noise is an exact
draw from ``softmax(logits / T)``. The noise of each completion comes from its own generator (seeded by
:func:`align.rollout.base.sample_seed`), so a completion is the same whichever prompts share its batch or
process; ``generate`` then runs greedy on the noised scores. Top-k and top-p cut the distribution
before the noise is added. The sampling log-probs returned are those of the cut, tempered distribution.

Memory: the sampler (:class:`GumbelSampler`, the last logits processor) knows the token it makes win at each
step, so it keeps only that token's log-prob, one number per row and step; ``generate`` runs without
``output_logits`` and no ``[rows, steps, vocab]`` tensor is ever built (at Qwen's 151,936-token vocabulary one fp32
copy of that is ~5 GB at 8 x 1,024 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align import progress
from align.fsdp2 import generate_kwargs
from align.modeling import pad_token_id
from align.rollout.base import Rollouts, SamplingParams, check_request, eos_token_ids, sample_seed


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` with everything outside the top-k / top-p (nucleus) set at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class GumbelSampler:
    """The last logits processor: picks each step's token and records its log-prob.

    With ``temperature > 0``: tempered, filtered scores plus per-row Gumbel noise (one generator per row), so
    ``generate``'s greedy argmax is an exact draw; with ``temperature == 0``: the scores unchanged (greedy). Either
    way it records, per step, the winning token of each row (``tokens``) and its log-prob under the distribution
    sampled from (``logps``: log_softmax of the tempered, filtered scores it received), ``[rows]`` each."""

    def __init__(self, sampling: SamplingParams, seeds: Sequence[int]):
        self.sampling = sampling
        self.generators = [torch.Generator().manual_seed(s) for s in seeds] if sampling.temperature > 0 else []
        self.tokens: list[torch.Tensor] = []
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        scores = scores.float()
        if s.temperature > 0:
            scores = filter_logits(scores / s.temperature, s.top_k, s.top_p)
        logps = scores.log_softmax(-1)
        if s.temperature > 0:
            u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
            scores = scores + -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        token = scores.argmax(-1)  # what generate's greedy step picks from the scores returned
        self.tokens.append(token)
        self.logps.append(logps.gather(-1, token.unsqueeze(-1)).squeeze(-1))
        return scores

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, logps)``, ``[rows, steps]`` each, on the CPU."""
        return torch.stack(self.tokens, 1).cpu(), torch.stack(self.logps, 1).cpu()


class HFEngine:
    """:class:`align.rollout.base.RolloutEngine` over a live ``transformers`` model (no weight copy, so
    ``sync_weights`` has nothing to do)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids[0])

    def extra_processors(self, input_ids, attention_mask) -> list:
        """Logits processors that change the distribution sampled from, run before the noise (none here)."""
        return []

    def sync_weights(self, model) -> None:  # generates with the training model itself
        self.model = model

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n_per_prompt: Sequence[int], sampling: SamplingParams,
                 keys: Sequence | None = None) -> Rollouts:
        keys = check_request(prompts, n_per_prompt, keys)
        rows = [(i, k) for i, n in enumerate(n_per_prompt) for k in range(n)]
        out = Rollouts()
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(rows), self.batch_size):
                self._generate_batch(prompts, keys, rows[s : s + self.batch_size], sampling, out)
                progress.advance(len(rows[s : s + self.batch_size]), "completions")  # the open stage's bar, if any
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts, keys, rows, sampling: SamplingParams, out: Rollouts) -> None:
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.model.device
        width = max(len(prompts[i]) for i, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, _) in enumerate(rows):
            p = list(prompts[i])
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        # generate fills every field left None from the model's generation_config: a model's repetition penalty or
        # minimum length would change the distribution sampled from, so they are set to "off" here
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=self.pad_id, bos_token_id=None, repetition_penalty=1.0,
                                  encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                                  renormalize_logits=False, remove_invalid_values=False)
        processors = LogitsProcessorList(self.extra_processors(ids.to(device), mask.to(device)))
        sampler = GumbelSampler(sampling, [sample_seed(sampling.seed, keys[i], k) for i, k in rows])
        processors.append(sampler)
        gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  logits_processor=processors, **generate_kwargs(self.model))
        new = gen[:, width:].cpu()
        picked, logps = sampler.recorded()
        eos = torch.tensor(self.eos_ids)
        for r, (i, k) in enumerate(rows):
            tokens = new[r].tolist()
            stop = next((t for t, tok in enumerate(tokens) if tok in eos), None)
            length = len(tokens) if stop is None else stop + 1
            out.prompt_index.append(i)
            out.sample_index.append(k)
            out.prompt_ids.append(list(prompts[i]))
            if picked[r, :length].tolist() != tokens[:length]:  # a processor after the sampler changed the pick
                raise RuntimeError(f"HFEngine: generate chose tokens the sampler did not pick (row {r})")
            out.completion_ids.append(tokens[:length])
            out.finish_reason.append("length" if stop is None else "stop")
            out.sampling_logps.append(logps[r, :length].tolist())
