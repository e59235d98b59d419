"""GRPO on testbed spec 3: held-out accuracy before and after, on several seeds (issue 19, point 2).

    python scripts/testbed_v3_grpo.py --seeds 0,1,2 [--steps N] [--eval-per-task 64] [--k 8]

Trains ``configs/grpo/testbed-v3.yaml`` (GRPO from ``testbed:v3-policy``, the spec-3 RL mix) once per seed and
measures, on held-out problems of the same mix that no training split ever serves: greedy accuracy and mean@k
(the mean correctness of k samples at temperature 1). Prints each seed, the mean and the spread (max − min) of
the gains, and the CPU seconds each run took (``time.process_time`` of this process: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
CONFIG = "configs/grpo/testbed-v3.yaml"


def held_out(model, tokenizer, rows, k: int) -> dict:
    from align.evaluation import held_out as measure
    from align.testbed.spec3 import MAX_NEW_TOKENS

    return measure(model, tokenizer, rows, k, MAX_NEW_TOKENS)


def run(seed: int, args, rows) -> dict:
    from align.config import load_config
    from align.recipes.grpo import GRPORecipeConfig, build_trainer

    c0, t0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        over = {"output_dir": out, "disable_tqdm": True, "max_steps": args.steps, "seed": seed, "report_to": "none",
                "logging_steps": args.log_every, "testbed_tasks": list(args.tasks),
                **({"learning_rate": args.lr} if args.lr else {}), **dict(args.set)}
        trainer = build_trainer(load_config(GRPORecipeConfig, CONFIG, over))
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        after = held_out(model, trainer.processing_class, rows, args.k)
    return {"seed": seed, "after": after, "train_wall_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
            "rollouts": trainer.rollouts_total}


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's max_steps)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    parser.add_argument("--tasks", default=None, help="comma-separated spec-3 tasks (default: the config's mix)")
    parser.add_argument("--set", nargs="*", default=[], type=lambda kv: (kv.split("=", 1)[0], yaml.safe_load(
        kv.split("=", 1)[1])), help="more config overrides, key=value (e.g. advantage=raft policy_loss=nll)")
    parser.add_argument("--log-every", type=int, default=10, help="trainer logging_steps (reward, loss)")
    parser.add_argument("--eval-per-task", type=int, default=64,
                        help="held-out problems per task of the mix (64: a standard error of ~4 points per task)")
    parser.add_argument("--k", type=int, default=8, help="samples per held-out problem for mean@k")
    parser.add_argument("--out", default="outputs/testbed_v3_grpo", help="results.json goes here")
    args = parser.parse_args()

    from align.modeling import load_model, load_tokenizer
    from align.testbed.arith import rl_rows
    from align.testbed.build import ensure_testbed

    config = yaml.safe_load(open(CONFIG, encoding="utf-8"))
    args.steps = args.steps or config["max_steps"]
    tasks = args.tasks = tuple(args.tasks.split(",") if args.tasks else config["testbed_tasks"])
    rows = rl_rows(tasks, n=args.eval_per_task * len(tasks), split="test")
    policy = ensure_testbed(spec=3).policy
    before = held_out(load_model(str(policy)), load_tokenizer(str(policy)), rows, args.k)
    spread = statistics.pstdev(before["solve_rates"])
    print(f"before: greedy {before['greedy']:.3f}  mean@{args.k} {before['mean_at_k']:.3f}  "
          f"{json.dumps(before['per_task'])} (solve rates: {sum(0 < s < 1 for s in before['solve_rates'])}/"
          f"{len(rows)} in (0,1), sd {spread:.2f})",
          flush=True)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run(seed, args, rows)
        runs.append(r)
        print(json.dumps(r["after"]["per_task"]))
        print(f"seed {seed}: greedy {r['after']['greedy']:.3f} ({r['after']['greedy'] - before['greedy']:+.3f})  "
              f"mean@{args.k} {r['after']['mean_at_k']:.3f} ({r['after']['mean_at_k'] - before['mean_at_k']:+.3f})  "
              f"train {r['train_cpu_s']:.0f} CPU-s / {r['train_wall_s']:.0f} s wall, {r['rollouts']} rollouts",
              flush=True)
    summary = {}
    for key in ("greedy", "mean_at_k"):
        gains = [r["after"][key] - before[key] for r in runs]
        summary[key] = {"before": before[key], "gain_mean": statistics.fmean(gains),
                        "gain_spread": max(gains) - min(gains), "gains": gains}
        print(f"{key}: {before[key]:.3f} -> {statistics.fmean(r['after'][key] for r in runs):.3f}, gain "
              f"{statistics.fmean(gains):+.3f} (seeds {', '.join(f'{g:+.3f}' for g in gains)}; "
              f"spread {max(gains) - min(gains):.3f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "before": before, "runs": runs, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
