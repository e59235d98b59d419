"""GVM against uniform allocation on the testbed: accuracy against total rollouts (estimation included).

    python scripts/bench_gvm.py [--steps 80] [--seeds 0 1 2] [--eval-every 10] [--out outputs/bench_gvm]

Variants, all GRPO with the same prompts per round (16), the same optimizer updates per round (2
mini-batches; docs/methods.md §13.6) and the same learning rate:

* ``uniform``   — 8 completions per prompt;
* ``gvm``       — N' = 8 estimation samples per prompt, then a budget N = 8 x prompts spread by GVM's rule
                  (the paper's setup: estimation samples are discarded);
* ``gvm-reuse`` — the same, training on the estimation samples too (only the extra n_i - N' generated).

Accuracy is the exact expected accuracy on every held-out fact (add1, sub1, mul1: graded difficulty) — the
policy's probability of the correct answer, :func:`align.evaluation.answer_probability` — so the curves
carry no sampling noise. Prints each variant's curve (mean over seeds), the ratio of rollouts GVM needs to
reach uniform's final accuracy, and writes ``gvm_vs_uniform.png`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "uniform": {"allocator": "uniform"},
    "gvm": {"allocator": "gvm", "gvm_samples": 8},
    "gvm-reuse": {"allocator": "gvm", "gvm_samples": 8, "gvm_reuse_samples": True},
}


def run(variant: str, seed: int, args, table) -> list[tuple[int, int, float]]:
    """(step, rollouts so far, expected accuracy) every ``eval_every`` steps, from step 0."""
    from transformers import TrainerCallback

    from align.config import load_config
    from align.evaluation import answer_probability
    from align.recipes.grpo import GRPORecipeConfig, build_trainer

    curve: list[tuple[int, int, float]] = []

    class Probe(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0:
                acc = answer_probability(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                                         table)["answer_probability"]
                curve.append((state.global_step, trainer.rollouts_total, acc))

    with tempfile.TemporaryDirectory() as out:
        over = {"output_dir": out, "disable_tqdm": True, "max_steps": args.steps, "seed": seed, "logging_steps": 1000,
                "learning_rate": args.lr, "dataset_test_split": None, "max_train_samples": 4096,
                **VARIANTS[variant]}
        trainer = build_trainer(load_config(GRPORecipeConfig, "configs/grpo/testbed.yaml", over))
        acc0 = answer_probability(trainer.model, trainer.processing_class, table)["answer_probability"]
        curve.append((0, 0, acc0))
        trainer.add_callback(Probe())
        trainer.train()
    return curve


def rollouts_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first rollout count at which the (rollouts, accuracy) curve reaches ``target`` (interpolated)."""
    for (r0, a0), (r1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            return r1 if a1 == a0 else r0 + (r1 - r0) * max(target - a0, 0) / (a1 - a0)
    return None


def main() -> None:
    from align.testbed.tasks import rl_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="outputs/bench_gvm")
    args = parser.parse_args()
    table = rl_rows(("add1", "sub1", "mul1"), n=None, split="test")
    results: dict[str, dict] = {}
    for variant in args.variants:
        runs, t0 = [], time.perf_counter()
        for seed in args.seeds:
            runs.append(run(variant, seed, args, table))
            print(f"{variant} seed {seed}: " + " ".join(f"{r}:{a:.4f}" for _, r, a in runs[-1]), flush=True)
        mean = [(runs[0][i][0], statistics.fmean(c[i][1] for c in runs), statistics.fmean(c[i][2] for c in runs))
                for i in range(len(runs[0]))]
        results[variant] = {"runs": runs, "mean": mean, "seconds": round(time.perf_counter() - t0, 1)}
    report(results, args)


def report(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    print("\nvariant      final acc (mean over seeds)  rollouts   seconds")
    for name, res in results.items():
        step, rollouts, acc = res["mean"][-1]
        print(f"{name:12s} {acc:.4f} (from {res['mean'][0][2]:.4f})   {rollouts:9.0f}  {res['seconds']:8.1f}")
    if "uniform" in results:
        _, r_u, a_u = results["uniform"]["mean"][-1]
        for name in (n for n in results if n != "uniform"):
            need = rollouts_to_reach([(r, a) for _, r, a in results[name]["mean"]], a_u)
            ratio = "not reached" if need is None else f"{need / r_u:.2f}x"
            print(f"rollouts {name} needs to reach uniform's final accuracy {a_u:.4f}: {ratio} "
                  f"({'-' if need is None else round(need)} vs {r_u:.0f}; target <= 0.5x)")
            results[name]["rollouts_ratio_to_uniform_final"] = None if need is None else need / r_u
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        for run in res["runs"]:
            ax.plot([r for _, r, _ in run], [a for _, _, a in run], alpha=0.25, lw=1)
        ax.plot([r for _, r, _ in res["mean"]], [a for _, _, a in res["mean"]], lw=2.5, label=name)
    ax.set_xlabel("total rollouts (estimation included)")
    ax.set_ylabel("expected held-out accuracy")
    ax.set_title(f"GRPO on the testbed, {len(args.seeds)} seeds: uniform vs GVM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "gvm_vs_uniform.png"), dpi=120)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=1)
    print(f"wrote {args.out}/gvm_vs_uniform.png and results.json")


if __name__ == "__main__":
    main()
