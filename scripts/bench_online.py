"""Online preference trainers on the testbed: online DPO, XPO, online IPO and EGPO at equal epochs and at equal
generations, under a transitive oracle (the verifier) and a non-transitive one (cyclic).

    python scripts/bench_online.py [--steps 40] [--batch 32] [--lr 5e-4] [--seed 0] [--out outputs/bench_online]

Methods (all from the warmed-up testbed policy, add1/sub1/mul1 prompts, same seed and learning rate):

* ``online_dpo``        — two policy samples per prompt, DPO on the oracle's label;
* ``xpo``               — online DPO's pair plus XPO's exploration term on a reference sample;
* ``online_ipo``        — EGPO's loss without the extragradient (oipo1: y, y′ and an opponent y″);
* ``egpo``              — extragradient: each prompt batch serves a half and a full step (equal epochs: 2x the
                          optimizer steps, generations and oracle calls);
* ``egpo (= gens)``     — EGPO with half the prompt batches, i.e. as many generations as online IPO.

Verifier oracle: the win rate against the initial policy, exactly (``½ + ½·(p − p₀)``, p the mean probability
of the canonical correct answer over all 219 facts: no sampling noise) and sampled (4 paired samples per
fact). Cyclic oracle (answer mod 3, rock-paper-scissors): the last iterate's exploitability, max over classes
c of P(c ≻ π) − ½ (0 at the Nash equilibrium, ⅓ per class), its class shares, and its win rate against the
initial policy. Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {
    "online_dpo": ("online_dpo", {}, 1),
    "xpo": ("xpo", {}, 1),
    "online_ipo": ("egpo", {"egpo_extragradient": False}, 1),
    "egpo": ("egpo", {}, 2),
    "egpo (= gens)": ("egpo", {}, 1),
}


def train(method: str, oracle: str, args, out_dir: str):
    from align.config import load_config
    from align.recipe import get_recipe

    recipe, overrides, factor = METHODS[method]
    steps = args.steps * factor  # Trainer steps: EGPO takes a half and a full step per prompt batch
    cfg = load_config(get_recipe(recipe).config_class, f"configs/{recipe}/testbed.yaml", {
        "output_dir": out_dir, "overwrite_output_dir": True, "max_steps": steps, "learning_rate": args.lr,
        "per_device_train_batch_size": args.batch, "seed": args.seed, "oracle": oracle, "disable_tqdm": True,
        "logging_steps": 1000, **overrides})
    from align.recipes.online_dpo import build_trainer

    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.train()
    # online DPO: y, y'; XPO: y and a reference sample; oipo1: y, y' and the opponent y''
    gens = (2 if recipe in ("online_dpo", "xpo") else 3) * args.batch * steps
    return trainer, {"optimizer_steps": steps, "generations": gens, "oracle_calls": trainer.oracle_calls,
                     "train_s": round(time.perf_counter() - start, 1)}


def cyclic_stats(trainer, rows, samples: int = 16) -> dict:
    """Class shares of the policy's samples and its exploitability under the cyclic oracle, per prompt, averaged."""
    from align.evaluation import cyclic_exploitability

    r = cyclic_exploitability(trainer.policy, trainer.processing_class, [r["prompt_ids"] for r in rows], samples, 16)
    return {k: round(v, 4 if k == "exploitability" else 3) for k, v in r.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="prompt batches at equal epochs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--oracles", nargs="+", default=["verifier:accuracy", "cyclic"])
    ap.add_argument("--out", default="outputs/bench_online")
    args = ap.parse_args()

    from align.evaluation import answer_probability, win_rate
    from align.rewards.preference import build_oracle
    from align.testbed.tasks import rl_rows

    facts = rl_rows(tasks=("add1", "sub1", "mul1"), n=None, split="test")  # every fact: 219
    results = []
    for oracle in args.oracles:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                trainer, r = train(method, oracle, args, tmp)
            tok, policy, ref = trainer.processing_class, trainer.policy, trainer.ref_model
            r.update(method=method, oracle=oracle)
            judge = build_oracle(oracle)
            r["win_rate_sampled"] = round(win_rate(policy, ref, tok, facts, judge, 4, 16)["win_rate"], 4)
            if oracle.startswith("verifier"):
                p, p0 = (answer_probability(m, tok, facts)["answer_probability"] for m in (policy, ref))
                r.update(answer_probability=round(p, 4), win_rate_exact=round(0.5 + 0.5 * (p - p0), 4))
            else:
                from datasets import Dataset

                from align.data.prompts import tokenize_prompts

                rows = tokenize_prompts(Dataset.from_list(facts[:64]), tok, 64)
                rows = [rows[i] for i in range(len(rows))]
                r.update(cyclic_stats(trainer, rows))
                r.update({f"initial_{k}": v for k, v in cyclic_stats(_as_initial(trainer), rows).items()})
            print(json.dumps(r), flush=True)
            results.append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(f"\n{'oracle':18} {'method':14} {'steps':>5} {'gens':>6} {'calls':>6} {'win(sampled)':>12} "
          f"{'win(exact)':>10} {'exploit':>8} {'train s':>7}")
    for r in results:
        print(f"{r['oracle']:18} {r['method']:14} {r['optimizer_steps']:5d} {r['generations']:6d} "
              f"{r['oracle_calls']:6d} {r['win_rate_sampled']:12.4f} {r.get('win_rate_exact', float('nan')):10.4f} "
              f"{r.get('exploitability', float('nan')):8.4f} {r['train_s']:7.1f}")


def _as_initial(trainer):
    """A stand-in whose ``policy`` is the trainer's frozen initial policy (for its cyclic statistics)."""
    return type("Initial", (), {"policy": trainer.ref_model, "processing_class": trainer.processing_class})()


if __name__ == "__main__":
    main()
