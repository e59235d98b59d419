"""Preference pairs from the policy's own samples, labelled by a verifier (rejection-sampled pairs).

For each prompt, sample k completions; a correct one becomes ``chosen`` (or the reference solution when
none is correct), an incorrect one ``rejected``; prompts the policy always gets right give no pair.
Training on the policy's own mistakes is what offline pairs with synthetic wrong answers cannot do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from align.evaluation import generate


def sampled_pairs(model, tokenizer, rows: Sequence[dict], verify: Callable[[str, object], bool],
                  reference: Callable[[dict], str] | None = None, k: int = 4, temperature: float = 1.0,
                  max_new_tokens: int = 32, seed: int = 0, progress: bool = False) -> list[dict]:
    """Pairs ``{prompt, chosen, rejected, ...}`` from ``rows`` (each with ``prompt`` and ``answer``).

    ``verify(completion, answer)`` judges a sample; ``reference(row)`` gives the fallback chosen text
    when no sample is correct (None: such prompts give no pair). Conversational prompts give
    conversational pairs. Deterministic for a given ``seed``.
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
        good = [c for c in mine if verify(c, row["answer"])]
        bad = [c for c in mine if not verify(c, row["answer"])]
        chosen = good[0] if good else (reference(row) if reference else None)
        if not bad or chosen is None or chosen == bad[0]:
            continue
        wrap = (lambda t: [{"role": "assistant", "content": t}]) if not isinstance(row["prompt"], str) else str
        pairs.append({**row, "chosen": wrap(chosen), "rejected": wrap(bad[0])})
    return pairs
