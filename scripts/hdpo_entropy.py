"""H-DPO's entropy control on the testbed: train with α in {0.5, 1, 2} (same seed and steps) and print the
policy's mean next-token entropy along its greedy answers to held-out prompts.

    python scripts/hdpo_entropy.py [--pairs tie|synthetic] [--steps 20] [--lr 1e-4] [--beta 1.0] [--seeds 0 1 2]

METHODS §4 predicts entropy(α=0.5) < entropy(α=1, DPO) < entropy(α=2).

* ``--pairs tie`` (default; what ``tests/test_preference_trainer.py`` asserts): preference-free pairs
  (:func:`align.data.sampled_pairs.tie_pairs`, two distinct policy samples in both orders) on the
  even-indexed add1/sub1/mul1 facts, trained full-batch; the odd-indexed facts are held out. DPO's optimum
  is then the reference itself and H-DPO's is π_ref^{1/α}, so only the entropy term moves the policy.
  ``--seeds`` picks the sampling seed of the pairs (training is full-batch, so it has no other randomness).
* ``--pairs synthetic``: the testbed's synthetic pairs (rejected = the right derivation with a wrong
  number), mini-batches of 16, ``--seeds`` as training seeds, held-out = the default test split. Here the
  preference signal dominates and the ordering is not stable (DPO's chosen log-probs collapse, and the
  dynamics are chaotic at learning rates that move anything).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG = Path(__file__).resolve().parents[1] / "configs/dpo/testbed.yaml"


def main() -> None:
    from align.config import load_config
    from align.data.sampled_pairs import tie_pairs
    from align.evaluation import accuracy
    from align.modeling import load_model, load_tokenizer
    from align.testbed.build import ensure_testbed
    from align.testbed.tasks import rl_rows
    from recipes.dpo import DPORecipeConfig, build_trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", choices=["tie", "synthetic"], default="tie")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    policy = str(ensure_testbed(progress=False).policy)
    tok = load_tokenizer(policy)
    table = rl_rows(("add1", "sub1", "mul1"), n=None, split="test")
    held = table[1::2] if args.pairs == "tie" else table
    print(f"before training: held-out entropy {accuracy(load_model(policy), tok, held)['entropy']:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            over = {"max_steps": args.steps, "learning_rate": args.lr, "beta": args.beta, "disable_tqdm": True,
                    "logging_steps": args.steps, "seed": seed, "objective": "hdpo"}
            if args.pairs == "tie":
                pairs = tie_pairs(load_model(policy), tok, table[0::2], k=4, seed=seed)
                path = Path(tmp) / f"pairs-{seed}.jsonl"
                path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
                over.update(dataset_name=str(path), dataset_test_split=None, max_train_samples=None,
                            per_device_train_batch_size=len(pairs), seed=0)
            row = {}
            for alpha in (0.5, 1.0, 2.0):
                out = f"{tmp}/{seed}-{alpha}"
                config = load_config(DPORecipeConfig, CONFIG, {**over, "alpha": alpha, "output_dir": out})
                trainer = build_trainer(config)
                trainer.train()
                ev = accuracy(trainer.model, tok, held)
                row[alpha] = f"{ev['entropy']:.4f} (acc {ev['accuracy']:.3f})"
            print(f"{args.pairs} pairs, seed {seed}: entropy " + ", ".join(f"alpha={a}: {e}" for a, e in row.items()),
                  flush=True)


if __name__ == "__main__":
    main()
