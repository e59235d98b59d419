"""H-DPO's entropy control on the testbed: train with α in {0.5, 1, 2} (same seed and steps) and print the
policy's entropy on held-out prompts, two ways: the mean next-token entropy along its greedy answers, and the
sequence entropy −E_y log π(y|x) estimated from 8 samples per prompt (:func:`align.evaluation.sequence_entropy`).

    python scripts/hdpo_entropy.py [--pairs verifier|tie|synthetic] [--steps N] [--lr X] [--beta B] [--seeds 0 1 2]

docs/methods.md §4 predicts entropy(α=0.5) < entropy(α=1, DPO) < entropy(α=2).

* ``--pairs verifier`` (default; what ``tests/test_preference_trainer.py`` asserts): the quickstart's pairs
  (:func:`align.quickstart.write_verifier_pairs`: the policy's own samples on training prompts, a right and a
  wrong one), 120 steps of 16 at lr 2e-5, β = 0.1; held out: the 219 add1/sub1/mul1 test facts; ``--seeds``
  are training seeds (data order).
* ``--pairs tie``: preference-free pairs (:func:`align.data.sampled_pairs.tie_pairs`, two distinct policy
  samples in both orders) on the even-indexed test facts, trained full-batch (20 steps, lr 1e-4, β = 1); the
  odd-indexed facts are held out. DPO's optimum is the reference itself and H-DPO's is π_ref^{1/α}; the pair
  gaps follow 1/α, but α = 0.5 lowers both samples of a pair and the freed mass raises held-out entropy.
  ``--seeds`` pick the sampling seed of the pairs.
* ``--pairs synthetic``: the testbed's synthetic pairs (rejected = the right derivation with a wrong number),
  same defaults as ``verifier``; the preference signal dominates and the ordering is not stable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG = Path(__file__).resolve().parents[1] / "configs/dpo/testbed.yaml"


DEFAULTS = {"verifier": dict(steps=120, lr=2e-5, beta=0.1), "synthetic": dict(steps=120, lr=2e-5, beta=0.1),
            "tie": dict(steps=20, lr=1e-4, beta=1.0)}


def main() -> None:
    from align.config import load_config
    from align.data.sampled_pairs import tie_pairs
    from align.evaluation import accuracy, sequence_entropy
    from align.modeling import load_model, load_tokenizer
    from align.quickstart import write_verifier_pairs
    from align.recipes.dpo import DPORecipeConfig, build_trainer
    from align.testbed.build import ensure_testbed
    from align.testbed.tasks import rl_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", choices=list(DEFAULTS), default="verifier")
    parser.add_argument("--steps", type=int, help="default: 120 (verifier, synthetic), 20 (tie)")
    parser.add_argument("--lr", type=float, help="default: 2e-5 (verifier, synthetic), 1e-4 (tie)")
    parser.add_argument("--beta", type=float, help="default: 0.1 (verifier, synthetic), 1.0 (tie)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for key, value in DEFAULTS[args.pairs].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    policy = str(ensure_testbed(progress=False).policy)
    tok = load_tokenizer(policy)
    table = rl_rows(("add1", "sub1", "mul1"), n=None, split="test")
    held = table[1::2] if args.pairs == "tie" else table

    def entropies(model) -> str:
        ev = accuracy(model, tok, held)
        seq = sequence_entropy(model, tok, held)
        return f"greedy {ev['entropy']:.4f}, sequence {seq:.3f} (acc {ev['accuracy']:.3f})"

    print(f"{args.pairs} pairs, {args.steps} steps, lr {args.lr}, beta {args.beta}; held-out entropy before "
          f"training: {entropies(load_model(policy))}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        over = {"max_steps": args.steps, "learning_rate": args.lr, "beta": args.beta, "disable_tqdm": True,
                "logging_steps": args.steps, "objective": "hdpo", "dataset_test_split": None, "max_train_samples": None}
        if args.pairs == "verifier":
            path = Path(tmp) / "pairs.jsonl"
            write_verifier_pairs(load_model(policy), tok, path)
            over["dataset_name"] = str(path)
        elif args.pairs == "synthetic":
            over.update(dataset_test_split="test", max_train_samples=1024)
        for seed in args.seeds:
            over["seed"] = seed
            if args.pairs == "tie":
                pairs = tie_pairs(load_model(policy), tok, table[0::2], k=4, seed=seed)
                path = Path(tmp) / f"pairs-{seed}.jsonl"
                path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
                over.update(dataset_name=str(path), per_device_train_batch_size=len(pairs), seed=0)
            for alpha in (0.5, 1.0, 2.0):
                config = load_config(DPORecipeConfig, CONFIG, {**over, "alpha": alpha,
                                                               "output_dir": f"{tmp}/{seed}-{alpha}"})
                trainer = build_trainer(config)
                trainer.train()
                print(f"seed {seed}, alpha {alpha}: {entropies(trainer.model)}", flush=True)


if __name__ == "__main__":
    main()
