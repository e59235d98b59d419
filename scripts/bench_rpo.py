"""RPO vs DPO on testbed spec 3: the policy's log-prob of the chosen responses before and after (issue 19, point 3).

    python scripts/bench_rpo.py [--steps 120] [--lr 2e-5] [--beta 0.1] [--eta 1.0] [--sft-norm mean]
        [--seeds 0 1 2] [--out outputs/bench_rpo]

docs/methods.md §3 (Liu et al., arXiv:2405.16436): DPO lowers the chosen responses' log-probs while it widens the
margin; RPO's SFT term on the chosen response keeps them up (or raises them). Pairs: ``testbed:v3-policy``'s own
samples (4 a prompt, 64 new tokens) on 768 training prompts of sub2d + mul2d, a right and a wrong one of a prompt
(:func:`align.quickstart.write_verifier_pairs`, prompts without a right sample give none). Held-out pairs: the
same, made on every test problem of the two tasks. Both objectives train ``configs/dpo/testbed.yaml`` (policy and
reference ``testbed:v3-policy``, ``max_length`` 128) with the same pairs, seed (data order), steps, lr and β;
RPO adds η·NLL_mean(y_w) (``sft_norm: mean``, η = 1: the form of ``configs/dpo/quickstart.yaml``).

Measured per run: the mean summed log-prob (nats) of the chosen and rejected responses of the train pairs and of the
held-out pairs, before (the reference) and after; held-out greedy accuracy (every test problem, 64 new tokens).
Prints a markdown table (per seed, mean, spread = max − min) and writes ``results.json`` and ``chosen_logps.png``.
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
TASKS = ("sub2d", "mul2d")
OBJECTIVES = ("dpo", "rpo")


def pair_logps(model, ds, pad_token_id: int, batch_size: int = 64) -> dict:
    """Mean summed log-probs (nats) of the chosen and rejected completions of a tokenised preference dataset."""
    import torch

    from align.data.preference import PreferenceCollator
    from align.logps import sequence_logps

    collate = PreferenceCollator(pad_token_id)
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(ds), batch_size):
                batch = collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
                logps, _, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"])
                half = batch["row_id"].shape[0]
                chosen += logps[:half].tolist()
                rejected += logps[half:].tolist()
    finally:
        model.train(was_training)
    return {"chosen": statistics.fmean(chosen), "rejected": statistics.fmean(rejected)}


def measure(model, tok, train, held, rows) -> dict:
    from align.evaluation import accuracy
    from align.testbed.spec3 import MAX_NEW_TOKENS

    return {"train": pair_logps(model, train, tok.pad_token_id), "held": pair_logps(model, held, tok.pad_token_id),
            "accuracy": accuracy(model, tok, rows, max_new_tokens=MAX_NEW_TOKENS)["accuracy"]}


def report(before: dict, runs: list[dict], args) -> str:
    lines = ["| objective | seed | train chosen: after (Δ) | held-out chosen: after (Δ) | held-out rejected: after (Δ) "
             "| held-out greedy acc |", "|---|---|---:|---:|---:|---:|"]

    def cells(vals: dict) -> str:
        return (f"{vals['train_chosen']:.3f} ({vals['d_train_chosen']:+.3f}) | {vals['held_chosen']:.3f} "
                f"({vals['d_held_chosen']:+.3f}) | {vals['held_rejected']:.2f} ({vals['d_held_rejected']:+.2f}) | "
                f"{vals['accuracy']:.3f}")

    for objective in OBJECTIVES:
        mine = [r for r in runs if r["objective"] == objective]
        for r in mine:
            lines.append(f"| {objective} | {r['seed']} | {cells(r)} |")
        lines.append(f"| {objective} | mean | {cells({k: statistics.fmean([r[k] for r in mine]) for k in FLAT})} |")
        spread = {k: max(r[k] for r in mine) - min(r[k] for r in mine) for k in FLAT}
        lines.append(f"| {objective} | spread | {spread['train_chosen']:.3f} | {spread['held_chosen']:.3f} | "
                     f"{spread['held_rejected']:.2f} | {spread['accuracy']:.3f} |")
    lines.append(f"| before | | {before['train']['chosen']:.3f} | {before['held']['chosen']:.3f} | "
                 f"{before['held']['rejected']:.2f} | {before['accuracy']:.3f} |")
    by = {(r["objective"], r["seed"]): r for r in runs}
    for key, title in (("train_chosen", "train"), ("held_chosen", "held-out")):
        gaps = [by["rpo", s][key] - by["dpo", s][key] for s in args.seeds]
        below = {o: sum(by[o, s][f"d_{key}"] < 0 for s in args.seeds) for o in OBJECTIVES}
        lines.append(f"\n{title} chosen log-prob, RPO − DPO after training: "
                     f"{', '.join(f'{g:+.3f}' for g in gaps)} (mean {statistics.fmean(gaps):+.3f}); RPO above DPO on "
                     f"{sum(g > 0 for g in gaps)} of {len(gaps)} seeds; fell below before: DPO {below['dpo']}, "
                     f"RPO {below['rpo']} of {len(gaps)} seeds")
    return "\n".join(lines)


FLAT = ("train_chosen", "d_train_chosen", "held_chosen", "d_held_chosen", "held_rejected", "d_held_rejected",
        "accuracy")


def plot(before: dict, runs: list[dict], args, path: str) -> None:
    from align.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    colours = {"dpo": "tab:red", "rpo": "tab:blue"}
    ax = axes[0]
    for r in runs:
        steps, values = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(steps, values, color=colours[r["objective"]], alpha=0.6, lw=1,
                label=f"{r['objective'].upper()}" if r["seed"] == args.seeds[0] else None)
    ax.set_title("train batches: chosen log-prob (nats)")
    ax.set_xlabel("step")
    ax.legend()
    for ax, (key, title) in zip(axes[1:], (("d_train_chosen", "Δ chosen log-prob, train pairs (nats)"),
                                           ("d_held_chosen", "Δ chosen log-prob, held-out pairs (nats)"),
                                           ("accuracy", "held-out greedy accuracy")), strict=True):
        for i, objective in enumerate(OBJECTIVES):
            vals = [r[key] for r in runs if r["objective"] == objective]
            ax.bar(i, statistics.fmean(vals), color=colours[objective], alpha=0.35)
            ax.plot([i] * len(vals), vals, "o", color=colours[objective])
        if key == "accuracy":
            ax.axhline(before["accuracy"], color="grey", ls="--", lw=1, label="before")
            ax.legend()
        else:
            ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(range(len(OBJECTIVES)), [o.upper() for o in OBJECTIVES])
        ax.set_title(title)
    fig.suptitle(f"RPO (η {args.eta}, sft_norm {args.sft_norm}) vs DPO on testbed spec 3 verifier pairs: "
                 f"{args.steps} steps of 16, lr {args.lr}, β {args.beta}; seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from datasets import Dataset

    from align.config import load_config
    from align.data.preference import tokenize_preferences
    from align.modeling import load_model, load_tokenizer
    from align.quickstart import write_verifier_pairs
    from align.recipes.dpo import DPORecipeConfig, build_trainer
    from align.testbed.arith import rl_rows
    from align.testbed.build import ensure_testbed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eta", type=float, default=1.0, help="RPO's SFT weight")
    parser.add_argument("--sft-norm", default="mean", choices=("sum", "mean", "token"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", default="outputs/bench_rpo")
    args = parser.parse_args()
    c0, t0 = time.process_time(), time.perf_counter()
    policy = str(ensure_testbed(spec=3, progress=False).policy)
    tok = load_tokenizer(policy)
    rows = rl_rows(TASKS, n=None, split="test")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"train": os.path.join(tmp, "train.jsonl"), "held": os.path.join(tmp, "held.jsonl")}
        model = load_model(policy)
        n_train = write_verifier_pairs(model, tok, paths["train"], spec=3, tasks=TASKS, reference=False)
        n_held = write_verifier_pairs(model, tok, paths["held"], spec=3, tasks=TASKS, split="test", prompts=None,
                                      reference=False)
        over = {"model_name_or_path": "testbed:v3-policy", "testbed_tasks": list(TASKS), "max_length": 128,
                "dataset_name": paths["train"], "dataset_test_split": None, "max_train_samples": None,
                "max_steps": args.steps, "learning_rate": args.lr, "beta": args.beta, "disable_tqdm": True,
                "logging_steps": args.log_every, "report_to": "none"}
        config = load_config(DPORecipeConfig, CONFIG, {**over, "output_dir": tmp})
        data = {k: tokenize_preferences(Dataset.from_list([json.loads(x) for x in open(p, encoding="utf-8")]), tok,
                                        config.max_length, k) for k, p in paths.items()}
        before = measure(model, tok, data["train"], data["held"], rows)
        print(f"{n_train} train pairs, {n_held} held-out pairs ({len(rows)} held-out problems); before: chosen "
              f"log-prob train {before['train']['chosen']:.3f}, held-out {before['held']['chosen']:.3f} (rejected "
              f"{before['held']['rejected']:.2f}); greedy accuracy {before['accuracy']:.3f}", flush=True)
        for seed in args.seeds:
            for objective in OBJECTIVES:
                c1 = time.process_time()
                extra = {"eta": args.eta, "sft_norm": args.sft_norm} if objective == "rpo" else {}
                config = load_config(DPORecipeConfig, CONFIG, {**over, **extra, "objective": objective, "seed": seed,
                                                               "output_dir": os.path.join(tmp, f"{objective}-{seed}")})
                trainer = build_trainer(config)
                trainer.train()
                after = measure(trainer.model, tok, data["train"], data["held"], rows)
                curve = [(h["step"], h["logps/chosen"]) for h in trainer.state.log_history if "logps/chosen" in h]
                r = {"objective": objective, "seed": seed, "after": after, "curve": curve,
                     "train_chosen": after["train"]["chosen"], "held_chosen": after["held"]["chosen"],
                     "held_rejected": after["held"]["rejected"], "accuracy": after["accuracy"],
                     "cpu_s": round(time.process_time() - c1, 1)}
                for key, (part, side) in (("train_chosen", ("train", "chosen")), ("held_chosen", ("held", "chosen")),
                                          ("held_rejected", ("held", "rejected"))):
                    r[f"d_{key}"] = r[key] - before[part][side]
                runs.append(r)
                print(f"seed {seed}, {objective}: chosen log-prob train {r['train_chosen']:.3f} "
                      f"({r['d_train_chosen']:+.3f}), held-out {r['held_chosen']:.3f} ({r['d_held_chosen']:+.3f}); "
                      f"held-out rejected {r['held_rejected']:.2f} ({r['d_held_rejected']:+.2f}); greedy accuracy "
                      f"{r['accuracy']:.3f}; {r['cpu_s']:.0f} CPU-s", flush=True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(f"\n`python scripts/bench_rpo.py --steps {args.steps} --lr {args.lr} --beta {args.beta} --eta {args.eta} "
          f"--sft-norm {args.sft_norm} --seeds {' '.join(map(str, args.seeds))}`; log-probs: mean summed nats per "
          f"completion; Δ = after − before; spread = max − min\n")
    print(report(before, runs, args))
    print(f"\n{cpu / 60:.1f} CPU-min, {wall / 60:.1f} min wall (this process)")
    os.makedirs(args.out, exist_ok=True)
    plot(before, runs, args, os.path.join(args.out, "chosen_logps.png"))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "pairs": {"train": n_train, "held": n_held}, "before": before, "runs": runs,
                   "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}, fh, indent=1)
    print(f"wrote {args.out}/results.json and {args.out}/chosen_logps.png")


if __name__ == "__main__":
    main()
