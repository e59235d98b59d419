"""Sample allocation against uniform on the testbed: held-out accuracy against total rollouts (estimation counted).

    python scripts/bench_gvm.py [--spec 3] [--recipe grpo|raft] [--variants uniform gvm-reuse dynamic]
                                [--steps 240] [--seeds 0 1 2] [--eval-every 40] [--out outputs/bench_gvm]

Variants, all with the same prompts a round, the same optimizer updates a round (2 mini-batches; docs/methods.md
§13.6), the same learning rate and seed:

* ``uniform``   — ``num_generations`` (8) completions per prompt;
* ``gvm``       — N' = 8 estimation samples per prompt, then a budget N = 8 x prompts spread by GVM's rule
                  (the paper's setup: estimation samples are discarded);
* ``gvm-reuse`` — the same, training on the estimation samples too (only the extra n_i - N' generated);
* ``dynamic``   — DAPO dynamic sampling: groups whose rewards are all equal are replaced by fresh prompts
                  (up to 3 extra rounds); every generated rollout counts.

``--recipe raft`` trains RAFT++ (advantage 1 for a verified-correct sample, the clipped surrogate) instead of GRPO.

Spec 3 (default): ``configs/grpo/testbed-v3.yaml`` (sub2d + mul2d from the warmed-up spec-3 policy); accuracy is
held-out greedy accuracy and mean@k (k samples at temperature 1, fixed sampling seed) on ``--eval-per-task``
problems a task that no training split serves. Spec 2: ``configs/grpo/testbed.yaml`` (or raft's), accuracy =
the exact expected accuracy on every held-out add1/sub1/mul1 fact (:func:`align.evaluation.answer_probability`).

Prints each run's curve, the rollouts each variant needs to reach uniform's final accuracy — from the seed means,
and per seed against the same seed's uniform run (mean and spread) — and writes ``curves_<recipe>.png``,
``allocation_<recipe>_<variant>.png`` (n_i against p_i and G_i early, midway and late in seed 0's run, from its
``allocation.jsonl``) and ``results_<recipe>.json`` under ``--out``. A run's results are cached in
``--out/runs/<recipe>-<variant>-s<seed>.json``; ``--fresh`` re-runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = {
    "uniform": {"allocator": "uniform"},
    "gvm": {"allocator": "gvm", "gvm_samples": 8},
    "gvm-reuse": {"allocator": "gvm", "gvm_samples": 8, "gvm_reuse_samples": True},
    "dynamic": {"allocator": "dynamic"},
}
RECIPES = {"grpo": {}, "raft": {"advantage": "raft", "policy_loss": "clip"}}
CONFIGS = {(2, "grpo"): "configs/grpo/testbed.yaml", (2, "raft"): "configs/raft/testbed.yaml",
           (3, "grpo"): "configs/grpo/testbed-v3.yaml", (3, "raft"): "configs/grpo/testbed-v3.yaml"}


class Evaluator:
    """The held-out measurement of one spec: ``__call__(model, tokenizer)`` gives ``{metric: value}``."""

    def __init__(self, spec: int, per_task: int, k: int, tasks):
        self.spec, self.k = spec, k
        if spec == 2:
            from align.testbed.tasks import rl_rows

            self.rows, self.metrics = rl_rows(("add1", "sub1", "mul1"), n=None, split="test"), ("expected",)
        else:
            from align.testbed.arith import rl_rows

            self.rows, self.metrics = rl_rows(tasks, n=per_task * len(tasks), split="test"), ("greedy", "mean_at_k")

    def __call__(self, model, tokenizer) -> dict[str, float]:
        from align.evaluation import answer_probability, held_out

        if self.spec == 2:
            return {"expected": answer_probability(model, tokenizer, self.rows)["answer_probability"]}
        from align.testbed.spec3 import MAX_NEW_TOKENS

        r = held_out(model, tokenizer, self.rows, self.k, MAX_NEW_TOKENS)
        return {"greedy": r["greedy"], "mean_at_k": r["mean_at_k"]}


def run(recipe: str, variant: str, seed: int, args, evaluate: Evaluator) -> dict:
    """One training run: ``curve`` = [step, rollouts so far, {metric: value}] every ``eval_every`` steps from 0."""
    import time

    from transformers import TrainerCallback

    from align.config import load_config
    from align.recipes.grpo import GRPORecipeConfig, build_trainer

    config = CONFIGS[(args.spec, recipe)]
    out = os.path.join(args.out, "runs", f"{recipe}-{variant}-s{seed}")
    curve: list = []

    class Probe(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0:
                policy = trainer.accelerator.unwrap_model(trainer.model)
                curve.append((state.global_step, trainer.rollouts_total, evaluate(policy, trainer.processing_class)))

    over = {"output_dir": out, "overwrite_output_dir": True, "disable_tqdm": True, "max_steps": args.steps,
            "seed": seed, "logging_steps": 10, "report_to": "none", "dataset_test_split": None,
            **({"learning_rate": args.lr} if args.lr else {}), **RECIPES[recipe], **VARIANTS[variant]}
    if args.spec == 2:
        over["max_train_samples"] = 4096
    trainer = build_trainer(load_config(GRPORecipeConfig, config, over))
    curve.append((0, 0, evaluate(trainer.model, trainer.processing_class)))
    trainer.add_callback(Probe())
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    result = {"curve": curve, "rollouts": trainer.rollouts_total, "wall_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round(time.process_time() - c0, 1), "config": config,
              "overrides": {k: v for k, v in over.items() if k not in ("output_dir",)}}
    alloc = os.path.join(out, "allocation.jsonl")
    if os.path.exists(alloc):
        with open(alloc, encoding="utf-8") as fh:
            result["allocation"] = [json.loads(line) for line in fh if line.strip()]
    with open(os.path.join(out, "..", f"{recipe}-{variant}-s{seed}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    shutil.rmtree(out, ignore_errors=True)  # this script's own run folder: the checkpoint-free trainer output
    return result


def rollouts_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first rollout count at which the (rollouts, accuracy) curve reaches ``target`` (interpolated)."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (r0, a0), (r1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            return r1 if a1 == a0 else r0 + (r1 - r0) * max(target - a0, 0) / (a1 - a0)
    return None


def mean_curve(runs: list[dict], metric: str) -> list[tuple[float, float]]:
    return [(statistics.fmean(r["curve"][i][1] for r in runs), statistics.fmean(r["curve"][i][2][metric] for r in runs))
            for i in range(len(runs[0]["curve"]))]


def ratios(results: dict, metric: str) -> dict:
    """Per variant: rollouts to reach uniform's final ``metric`` / uniform's rollouts, from the seed means and per
    seed (against the same seed's uniform run)."""
    base = results["uniform"]
    r_u, a_u = mean_curve(base, metric)[-1]
    out = {}
    for name, runs in results.items():
        if name == "uniform":
            continue
        need = rollouts_to_reach(mean_curve(runs, metric), a_u)
        per_seed = []
        for run_v, run_u in zip(runs, base):
            target = run_u["curve"][-1][2][metric]
            n = rollouts_to_reach([(r, m[metric]) for _, r, m in run_v["curve"]], target)
            per_seed.append(None if n is None else n / run_u["curve"][-1][1])
        out[name] = {"from_means": None if need is None else need / r_u, "per_seed": per_seed, "target": a_u,
                     "uniform_rollouts": r_u}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=int, default=3, choices=(2, 3))
    parser.add_argument("--recipe", default="grpo", choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=["uniform", "gvm-reuse"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--eval-per-task", type=int, default=64, help="spec 3: held-out problems a task")
    parser.add_argument("--k", type=int, default=8, help="spec 3: samples a held-out problem for mean@k")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    parser.add_argument("--out", default="outputs/bench_gvm")
    parser.add_argument("--fresh", action="store_true", help="re-run runs cached under --out/runs")
    args = parser.parse_args()
    if "uniform" not in args.variants:
        parser.error("--variants: include uniform (the ratios are against it)")
    import yaml

    tasks = yaml.safe_load(open(CONFIGS[(args.spec, args.recipe)], encoding="utf-8"))["testbed_tasks"]
    evaluate = Evaluator(args.spec, args.eval_per_task, args.k, tasks)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    results: dict[str, list[dict]] = {}
    for variant in args.variants:
        results[variant] = []
        for seed in args.seeds:
            cached = os.path.join(args.out, "runs", f"{args.recipe}-{variant}-s{seed}.json")
            if os.path.exists(cached) and not args.fresh:
                with open(cached, encoding="utf-8") as fh:
                    r = json.load(fh)
            else:
                r = run(args.recipe, variant, seed, args, evaluate)
            results[variant].append(r)
            points = "  ".join(f"{step}/{roll}:" + ",".join(f"{v:.3f}" for v in m.values())
                               for step, roll, m in r["curve"])
            print(f"{args.recipe} {variant} seed {seed} ({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s): {points}",
                  flush=True)
    report(results, args, evaluate.metrics)


def report(results: dict, args, metrics) -> None:
    from align.plots import pyplot

    plt = pyplot()
    summary = {m: ratios(results, m) for m in metrics}
    print(f"\n{args.recipe}, spec {args.spec}, {args.steps} steps, seeds {args.seeds}")
    for name, runs in results.items():
        finals = {m: [r["curve"][-1][2][m] for r in runs] for m in metrics}
        text = "  ".join(f"{m} {runs[0]['curve'][0][2][m]:.3f} -> {statistics.fmean(v):.3f} "
                         f"({', '.join(f'{x:.3f}' for x in v)})" for m, v in finals.items())
        print(f"{name:10s} {text}  rollouts {statistics.fmean(r['rollouts'] for r in runs):.0f}")
    for m, per in summary.items():
        for name, s in per.items():
            seeds = [x for x in s["per_seed"] if x is not None]
            spread = f"mean {statistics.fmean(seeds):.2f}x, spread {max(seeds) - min(seeds):.2f}" if seeds else "-"
            means = "not reached" if s["from_means"] is None else f"{s['from_means']:.2f}x"
            print(f"{m}: rollouts {name} needs to reach uniform's final {s['target']:.3f}: {means} "
                  f"(seed means); per seed {[None if x is None else round(x, 2) for x in s['per_seed']]} ({spread}); "
                  f"target <= 0.5x")
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for i, (name, runs) in enumerate(results.items()):
            for r in runs:
                ax.plot([x[1] for x in r["curve"]], [x[2][m] for x in r["curve"]], color=f"C{i}", alpha=0.25, lw=1)
            mc = mean_curve(runs, m)
            ax.plot([x for x, _ in mc], [y for _, y in mc], color=f"C{i}", lw=2.5, label=name)
        ax.set_xlabel("total rollouts (estimation included)")
        ax.set_ylabel(f"held-out {m}")
        ax.legend()
    fig.suptitle(f"{args.recipe} on testbed spec {args.spec}, {len(args.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"curves_{args.recipe}.png"), dpi=110)
    plt.close(fig)
    for name, runs in results.items():
        if runs[0].get("allocation") and name.startswith("gvm"):
            path = os.path.join(args.out, f"allocation_{args.recipe}_{name}.png")
            allocation_figure(plt, runs[0]["allocation"], path, f"{args.recipe} {name}, seed {args.seeds[0]}")
    with open(os.path.join(args.out, f"results_{args.recipe}.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "summary": summary,
                   "results": {n: [{k: v for k, v in r.items() if k != "allocation"} for r in runs]
                               for n, runs in results.items()}}, fh, indent=1)
    print(f"wrote {args.out}/curves_{args.recipe}.png, allocation_{args.recipe}_*.png and results_{args.recipe}.json")


def allocation_figure(plt, rounds: list[dict], path: str, title: str) -> None:
    """n_i against p_i (top) and G_i (bottom) in the first, middle and last round."""
    picks = [rounds[0], rounds[len(rounds) // 2], rounds[-1]]
    thirds = [rounds[:len(rounds) // 3], rounds[len(rounds) // 3:2 * len(rounds) // 3], rounds[2 * len(rounds) // 3:]]
    for name, part in zip(("first", "middle", "last"), thirds):
        n = [x for rec in part for x in rec["n"]]
        p = [x for rec in part for x in rec["p"] if x is not None]
        top = [sum(sorted(rec["n"], reverse=True)[:max(1, len(rec["n"]) // 10)]) / max(sum(rec["n"]), 1)
               for rec in part]
        print(f"{title}, {name} third of the rounds: prompts dropped (n_i = 0) {sum(x == 0 for x in n) / len(n):.2f}, "
              f"estimated p_i = 0 {sum(x == 0 for x in p) / max(len(p), 1):.2f}, largest n_i {max(n)}, budget share of "
              f"the top tenth of prompts {statistics.fmean(top):.2f}")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for col, rec in enumerate(picks):
        for row, key in enumerate(("p", "G")):
            pts = [(x, n) for x, n in zip(rec[key], rec["n"]) if x is not None]
            ax = axes[row][col]
            ax.scatter([x for x, _ in pts], [n for _, n in pts], s=14, alpha=0.7)
            ax.set_xlabel("p_i (solve rate estimate)" if key == "p" else "G_i (gradient size estimate)")
            ax.set_ylabel("n_i (rollouts)")
            ax.set_title(f"round {rec['round']} (step {rec['step']}), {rec['generated']} generated")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
