"""H-DPO's entropy control on the testbed: train with α in {0.5, 1, 2} (same seed and steps) and print the
policy's entropy on held-out prompts, two ways: the mean next-token entropy along its greedy answers, and the
sequence entropy −E_y log π(y|x) estimated from 8 samples per prompt (:func:`align.evaluation.sequence_entropy`).

    python scripts/hdpo_entropy.py [--spec 3|2] [--pairs verifier|tie|synthetic] [--steps N] [--lr X] [--beta B]
        [--seeds 0 1 2] [--out outputs/hdpo_entropy]

docs/methods.md §4 predicts entropy(α=0.5) < entropy(α=1, DPO) < entropy(α=2). Each run prints a markdown table
(per seed, mean, spread = max − min) and writes ``spec<N>-<pairs>.json`` and ``.png`` into ``--out``.

``--spec 3`` (default): ``testbed:v3-policy`` on the spec-3 RL mix sub2d + mul2d, 64 new tokens;
``configs/dpo/testbed.yaml`` with ``model_name_or_path``, ``testbed_tasks`` and ``max_length`` (128: a ~17-token
prompt and 64 completion tokens) overridden. Held out: every test problem of the two tasks (331), entropies and
greedy accuracy over 64 new tokens.

* ``--pairs verifier`` (default): the policy's own samples on 768 training prompts (4 each, seed 0), a right and a
  wrong one of a prompt (:func:`align.quickstart.write_verifier_pairs`; spec 3: prompts without a right sample give
  no pair, so both sides are the policy's own samples), 120 steps of 16 at lr 2e-5, β = 0.1; ``--seeds`` are
  training seeds (data order).
* ``--pairs tie``: preference-free pairs (:func:`align.data.sampled_pairs.tie_pairs`, two distinct policy
  samples in both orders) on the even-indexed test problems, trained full-batch (20 steps, lr 1e-4, β = 1); the
  odd-indexed ones are held out. DPO's optimum is the reference itself and H-DPO's is π_ref^{1/α}.
  ``--seeds`` pick the sampling seed of the pairs.
* ``--pairs synthetic``: the testbed's synthetic pairs (rejected = the right derivation with a wrong number),
  same defaults as ``verifier``.

``--spec 2``: the old instrument (``testbed:policy``, add1/sub1/mul1, the quickstart's verifier pairs with the
reference solution standing in when no sample is right, 16 new tokens for the pairs, 32 for the evaluation; held
out: the 219 test facts) with the config as shipped: the same numbers as before the spec-3 switch
(docs/benchmarks.md, 2026-11-24; ``tests/integration/test_preference_trainer.py`` asserts the ordering there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
CONFIG = Path(__file__).resolve().parents[1] / "configs/dpo/testbed.yaml"
ALPHAS = (0.5, 1.0, 2.0)
TASKS = {2: ("add1", "sub1", "mul1"), 3: ("sub2d", "mul2d")}
EVAL_TOKENS = {2: 32, 3: 64}  # new tokens of the held-out evaluation (spec 2: the evaluation's default)
KEYS = (("greedy_entropy", "greedy token entropy", ".3f"), ("sequence_entropy", "sequence entropy (nats)", ".2f"),
        ("accuracy", "greedy accuracy", ".3f"))
DEFAULTS = {"verifier": dict(steps=120, lr=2e-5, beta=0.1), "synthetic": dict(steps=120, lr=2e-5, beta=0.1),
            "tie": dict(steps=20, lr=1e-4, beta=1.0)}


def spec_overrides(spec: int) -> dict:
    """Config overrides that point ``configs/dpo/testbed.yaml`` at ``spec``'s policy and tasks."""
    if spec == 2:
        return {}
    return {"model_name_or_path": "testbed:v3-policy", "testbed_tasks": list(TASKS[3]), "max_length": 128}


def report(before: dict, runs: list[dict], args) -> str:
    """The markdown table (cells α = 0.5 / 1 / 2) with mean and spread rows; the ordering's count per reading."""
    lines = [f"| seed | {' | '.join(title for _, title, _ in KEYS)} |", "|---|" + "---|" * len(KEYS)]
    by = {(r["seed"], r["alpha"]): r for r in runs}

    def cell(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    for seed in args.seeds:
        lines.append(f"| {seed} | " + " | ".join(cell([by[seed, a][k] for a in ALPHAS], f) for k, _, f in KEYS) + " |")
    for name, fn in (("mean", statistics.fmean), ("spread", lambda v: max(v) - min(v))):
        lines.append(f"| {name} | " + " | ".join(
            cell([fn([by[s, a][k] for s in args.seeds]) for a in ALPHAS], f) for k, _, f in KEYS) + " |")
    lines.append(f"| before | {before['greedy_entropy']:.3f} | {before['sequence_entropy']:.2f} | "
                 f"{before['accuracy']:.3f} |")
    for key, title, _ in KEYS[:2]:
        holds = sum(by[s, 0.5][key] < by[s, 1.0][key] < by[s, 2.0][key] for s in args.seeds)
        lines.append(f"\n{title}: α = 0.5 < 1 < 2 on {holds} of {len(args.seeds)} seeds")
    return "\n".join(lines)


def plot(before: dict, runs: list[dict], args, path: str) -> None:
    from align.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 4))
    for ax, (key, title, _) in zip(axes, KEYS, strict=True):
        for seed in args.seeds:
            ax.plot(ALPHAS, [next(r[key] for r in runs if r["seed"] == seed and r["alpha"] == a) for a in ALPHAS],
                    "o-", alpha=0.45, lw=1, label=f"seed {seed}")
        ax.plot(ALPHAS, [statistics.fmean(r[key] for r in runs if r["alpha"] == a) for a in ALPHAS], "ks-", lw=2,
                label="mean")
        ax.axhline(before[key], color="grey", ls="--", lw=1, label="before")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ALPHAS, [str(a) for a in ALPHAS])
        ax.set_xlabel("α (1 = DPO)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"H-DPO on testbed spec {args.spec}, {args.pairs} pairs: {args.steps} steps, lr {args.lr}, "
                 f"β {args.beta}; held out: {args.held} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from align.config import load_config
    from align.data.sampled_pairs import tie_pairs
    from align.evaluation import accuracy, sequence_entropy
    from align.modeling import load_model, load_tokenizer
    from align.quickstart import write_verifier_pairs
    from align.recipes.dpo import DPORecipeConfig, build_trainer
    from align.testbed import arith, tasks
    from align.testbed.build import ensure_testbed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=int, choices=(2, 3), default=3, help="testbed spec (default 3)")
    parser.add_argument("--pairs", choices=list(DEFAULTS), default="verifier")
    parser.add_argument("--steps", type=int, help="default: 120 (verifier, synthetic), 20 (tie)")
    parser.add_argument("--lr", type=float, help="default: 2e-5 (verifier, synthetic), 1e-4 (tie)")
    parser.add_argument("--beta", type=float, help="default: 0.1 (verifier, synthetic), 1.0 (tie)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/hdpo_entropy", help="spec<N>-<pairs>.json and .png go here")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.pairs].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    c0, t0 = time.process_time(), time.perf_counter()
    new_tokens = EVAL_TOKENS[args.spec]
    policy = str(ensure_testbed(progress=False, spec=args.spec).policy)
    tok = load_tokenizer(policy)
    table = (arith if args.spec == 3 else tasks).rl_rows(TASKS[args.spec], n=None, split="test")
    held = table[1::2] if args.pairs == "tie" else table
    args.held = len(held)

    def entropies(model) -> dict:
        ev = accuracy(model, tok, held, max_new_tokens=new_tokens)
        seq = sequence_entropy(model, tok, held, max_new_tokens=new_tokens)
        return {"greedy_entropy": ev["entropy"], "sequence_entropy": seq, "accuracy": ev["accuracy"]}

    def line(e: dict) -> str:
        return (f"greedy {e['greedy_entropy']:.4f}, sequence {e['sequence_entropy']:.3f} "
                f"(acc {e['accuracy']:.3f})")

    before = entropies(load_model(policy))
    print(f"spec {args.spec}, {args.pairs} pairs, {args.steps} steps, lr {args.lr}, beta {args.beta}; held-out "
          f"entropy before training ({len(held)} prompts): {line(before)}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        over = {"max_steps": args.steps, "learning_rate": args.lr, "beta": args.beta, "disable_tqdm": True,
                "logging_steps": args.steps, "objective": "hdpo", "dataset_test_split": None, "max_train_samples": None,
                **spec_overrides(args.spec)}
        if args.pairs == "verifier":
            path = Path(tmp) / "pairs.jsonl"
            extra = {"spec": 3, "tasks": TASKS[3], "reference": False} if args.spec == 3 else {}
            n = write_verifier_pairs(load_model(policy), tok, path, **extra)
            print(f"{n} verifier pairs", flush=True)
            over["dataset_name"] = str(path)
        elif args.pairs == "synthetic":
            over.update(dataset_test_split="test", max_train_samples=1024)
        for seed in args.seeds:
            over["seed"] = seed
            if args.pairs == "tie":
                pairs = tie_pairs(load_model(policy), tok, table[0::2], k=4, seed=seed, max_new_tokens=new_tokens)
                path = Path(tmp) / f"pairs-{seed}.jsonl"
                path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
                over.update(dataset_name=str(path), per_device_train_batch_size=len(pairs), seed=0)
            for alpha in ALPHAS:
                c1 = time.process_time()
                config = load_config(DPORecipeConfig, CONFIG, {**over, "alpha": alpha,
                                                               "output_dir": f"{tmp}/{seed}-{alpha}"})
                trainer = build_trainer(config)
                trainer.train()
                e = entropies(trainer.model)
                runs.append({"seed": seed, "alpha": alpha, **e, "cpu_s": round(time.process_time() - c1, 1)})
                print(f"seed {seed}, alpha {alpha}: {line(e)}", flush=True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(f"\n`python scripts/hdpo_entropy.py --spec {args.spec} --pairs {args.pairs} --steps {args.steps} "
          f"--lr {args.lr} --beta {args.beta} --seeds {' '.join(map(str, args.seeds))}`; "
          f"cells: α = 0.5 / 1 / 2; spread = max − min; {len(held)} held-out prompts, {new_tokens} new tokens\n")
    print(report(before, runs, args))
    print(f"\n{cpu / 60:.1f} CPU-min, {wall / 60:.1f} min wall (this process)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"spec{args.spec}-{args.pairs}")
    plot(before, runs, args, stem + ".png")
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "before": before, "runs": runs, "cpu_s": round(cpu, 1),
                   "wall_s": round(wall, 1)}, fh, indent=1)
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
