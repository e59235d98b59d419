"""``allocation.jsonl``: what each RL round gave every prompt, for the allocation plots (:mod:`align.plots`).

One JSON line per round, appended by the main process when the round is made, in columns::

    {"round": 3, "step": 7, "budget": 32, "generated": 48,
     "uid": [..], "n": [..], "p": [..], "G": [..], "reward": [..]}

``step`` is the first optimizer step trained on the round, ``budget`` = ``num_generations`` x the round's prompts,
``generated`` the rollouts the round cost (GVM's estimation samples included). Per prompt: ``n`` its rollouts
n_i (0: dropped), ``p`` and ``G`` the latest per-prompt estimates the allocator read (GVM's solve rate p_i and
gradient size G_i; ``null`` for a prompt never estimated, e.g. under the uniform allocator), ``reward`` the mean
reward of its rollouts this round (``null`` when n_i = 0). Each line is one ``write`` of a whole line, so a crash
leaves whole lines (at most the last one cut, which readers skip); a resumed run first cuts the file back to its
checkpoint's step, as ``metrics.jsonl`` is.
"""

from __future__ import annotations

import json
import os

FILE = "allocation.jsonl"


def allocation_record(index: int, step: int, budget: int, generated: int, rows: list[dict], counts: list[int],
                      samples: list, stats) -> dict:
    """Round ``index``'s line: ``rows`` and ``counts`` as the allocator returned them, ``samples`` the round's
    (each with ``.g`` and ``.reward``), ``stats`` the :class:`~align.sampling.PromptStats` it allocated from."""
    rewards: dict[int, list[float]] = {}
    for s in samples:
        rewards.setdefault(s.g, []).append(s.reward)
    known = [stats.get(r["uid"]) or {} for r in rows]
    return {"round": index, "step": step, "budget": budget, "generated": generated,
            "uid": [r["uid"] for r in rows], "n": [int(n) for n in counts],
            "p": [k.get("accept_rate") for k in known], "G": [k.get("grad_norm") for k in known],
            "reward": [sum(rewards[i]) / len(rewards[i]) if rewards.get(i) else None for i in range(len(rows))]}


class AllocationLog:
    """Appends round records to ``<output_dir>/allocation.jsonl`` (call on the main process only)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, FILE)
        self.started = False

    def append(self, record: dict) -> None:
        from align.metrics import truncate_after  # (loads transformers: not at import, the plots read FILE)

        if not self.started:  # this run's first round: drop what a previous run, or the steps after the
            truncate_after(self.path, record["step"] - 1)  # checkpoint we resume from, left there
            self.started = True
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
