"""Preference pairs from the policy's own samples.

* :func:`sampled_pairs`, labelled by a verifier (rejection-sampled pairs): for each prompt, sample k
  completions; a correct one becomes ``chosen`` (or the reference solution when none is correct), an
  incorrect one ``rejected``; prompts the policy always gets right give no pair. Training on the policy's
  own mistakes is what offline pairs with synthetic wrong answers cannot do.
* :func:`tie_pairs`, with no preference at all: two distinct samples of a prompt, in both orders. Plain
  DPO has nothing to learn from them (the two orders' gradients cancel), so they isolate what an objective
  does besides following preferences, e.g. H-DPO's entropy term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from align.evaluation import generate


def as_completion(prompt, text):
    """``text`` as a completion in the format of ``prompt``: a string, or one assistant message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def sampled_pairs(model, tokenizer, rows: Sequence[dict], verify: Callable[[str, object], bool],
                  reference: Callable[[dict], str] | None = None, k: int = 4, temperature: float = 1.0,
                  max_new_tokens: int = 32, seed: int = 0, progress: bool = False) -> list[dict]:
    """Pairs ``{prompt, chosen, rejected, ...}`` from ``rows`` (each with ``prompt`` and ``answer``).

    ``verify(completion, answer)`` judges a sample; ``reference(row)`` gives the fallback chosen text
    when no sample is correct (None: such prompts give no pair); empty samples are left out. Conversational
    prompts give conversational pairs. Deterministic for a given ``seed``.
    """
    import torch

    if k < 2 and reference is None:
        raise ValueError("k: at least 2 samples per prompt are needed without a reference answer")
    torch.manual_seed(seed)
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, progress=progress,
                       desc="sample pairs", num_samples=k, temperature=temperature)
    pairs = []
    for i, row in enumerate(rows):
        mine = samples[i * k : (i + 1) * k]
        # an empty sample (end-of-sequence at once) cannot be a training row: it is neither chosen nor rejected
        mine = [c for c in mine if c.strip()]
        good = [c for c in mine if verify(c, row["answer"])]
        bad = [c for c in mine if not verify(c, row["answer"])]
        chosen = good[0] if good else (reference(row) if reference else None)
        if not bad or chosen is None or chosen == bad[0]:
            continue
        pairs.append({**row, "chosen": as_completion(row["prompt"], chosen),
                      "rejected": as_completion(row["prompt"], bad[0])})
    return pairs


def tie_pairs(model, tokenizer, rows: Sequence[dict], k: int = 4, temperature: float = 1.0, max_new_tokens: int = 32,
              seed: int = 0) -> list[dict]:
    """Preference-free pairs: the distinct samples of each prompt (k drawn), paired off (1st with 2nd, 3rd with
    4th, ...), each pair once in each order; empty samples are left out. Prompts with a single distinct sample give
    none. Deterministic for a given ``seed``.

    Under a pairwise loss −log σ(z) the two orders of a pair pull in opposite directions. For DPO they cancel
    (the optimum is the reference itself); for H-DPO (docs/methods.md §4) the optimum of the pair's two terms is
    α·(S_θ(a) − S_θ(b)) = S_ref(a) − S_ref(b), i.e. the reference's log-ratios scaled by 1/α: sharper for
    α < 1, flatter for α > 1, which is H-DPO's π* ∝ π_ref^{1/α} with a constant reward.
    """
    import torch

    if k < 2:
        raise ValueError("k: at least 2 samples per prompt are needed to form a pair")
    torch.manual_seed(seed)
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, desc="sample pairs",
                       num_samples=k, temperature=temperature)
    pairs = []
    for i, row in enumerate(rows):
        # empty samples (end-of-sequence at once) cannot be training rows, as in sampled_pairs
        distinct = list(dict.fromkeys(c for c in samples[i * k : (i + 1) * k] if c.strip()))
        for a, b in zip(distinct[0::2], distinct[1::2]):
            for x, y in ((a, b), (b, a)):
                pairs.append({**row, "chosen": as_completion(row["prompt"], x),
                              "rejected": as_completion(row["prompt"], y)})
    return pairs
