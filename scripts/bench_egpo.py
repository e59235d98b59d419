"""EGPO against online IPO and online DPO under the non-transitive (cyclic) oracle: the last iterate's exploitability
over training, on several seeds.

    python scripts/bench_egpo.py [--spec 3] [--steps 48] [--eval-every 8] [--seeds 0 1 2] [--out outputs/bench_egpo]

The cyclic oracle (``rewards.preference.CyclicOracle``) ranks an answer by its value mod 3, rock-paper-scissors:
its only Nash equilibrium puts ⅓ on each class, and a policy that leans to one class can be exploited. EGPO's
claim is last-iterate convergence to that equilibrium, where plain online preference optimisation may cycle.
Exploitability of a policy π: per held-out prompt, max over classes c of P(c ≻ π) − ½ (0 at the equilibrium),
estimated from ``--samples`` completions, averaged over ``--eval-prompts`` prompts (fixed sampling seed).

Methods, all from the same warmed-up policy, prompts, seed and learning rate, ``--steps`` optimizer steps each:

* ``online_dpo`` — two policy samples a prompt, DPO on the oracle's label (2 generations a prompt a step);
* ``online_ipo`` — EGPO's loss (oipo1: y, y′ and an opponent y″) without the extragradient (3 a prompt a step);
* ``egpo``       — the extragradient: a half and a full step per prompt batch, so at equal optimizer steps it has
                   as many generations as online IPO and half the prompt batches;
* ``egpo-epochs`` (opt-in) — EGPO with 2x the optimizer steps: as many prompt batches as online IPO.

Exploitability is measured at step 0 and every ``--eval-every`` optimizer steps (even, so EGPO is measured after
full steps: its iterate, not the half-step point). Prints each run's curve and a table of the final values (mean
and spread over seeds), writes ``exploitability.png`` (against optimizer steps and against generations) and
``results.json`` under ``--out``. Spec 3: sub2d + mul2d prompts from ``testbed:v3-policy``, 64-token completions;
spec 2: add1/sub1/mul1 from ``testbed:policy``.
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

# name: (recipe, overrides, optimizer steps per --steps, generations a prompt an optimizer step)
METHODS = {
    "online_dpo": ("online_dpo", {}, 1, 2),
    "online_ipo": ("egpo", {"egpo_extragradient": False}, 1, 3),
    "egpo": ("egpo", {}, 1, 3),
    "egpo-epochs": ("egpo", {}, 2, 3),
}
SPECS = {
    2: {"model_name_or_path": "testbed:policy", "testbed_tasks": ["add1", "sub1", "mul1"],
        "max_completion_length": 16},
    3: {"model_name_or_path": "testbed:v3-policy", "testbed_tasks": ["sub2d", "mul2d"], "max_completion_length": 64,
        "max_prompt_length": 32, "max_train_samples": 4096},
}


def held_out_prompts(spec: int, n: int, tokenizer) -> list[list[int]]:
    from align.evaluation import prompt_token_ids

    if spec == 2:
        from align.testbed.tasks import rl_rows

        rows = rl_rows(("add1", "sub1", "mul1"), n=None, split="test")[:n]
    else:
        from align.testbed.arith import rl_rows

        rows = rl_rows(tuple(SPECS[3]["testbed_tasks"]), n=n, split="test")
    return prompt_token_ids(tokenizer, rows)


def run(method: str, seed: int, args) -> dict:
    from transformers import TrainerCallback

    from align.config import load_config
    from align.evaluation import cyclic_exploitability
    from align.recipe import get_recipe
    from align.recipes.online_dpo import build_trainer

    recipe, overrides, factor, gens = METHODS[method]
    steps = args.steps * factor
    curve: list = []

    def measure(step: int) -> None:
        r = cyclic_exploitability(trainer.policy, trainer.processing_class, prompts, args.samples,
                                  SPECS[args.spec]["max_completion_length"])
        curve.append({"step": step, "generations": gens * args.batch * step, **r})

    class Probe(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step % args.eval_every == 0:
                measure(state.global_step)

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(get_recipe(recipe).config_class, f"configs/{recipe}/testbed.yaml", {
            "output_dir": out, "overwrite_output_dir": True, "max_steps": steps, "learning_rate": args.lr,
            "per_device_train_batch_size": args.batch, "seed": seed, "oracle": "cyclic", "disable_tqdm": True,
            "logging_steps": 1000, "report_to": "none", "dataset_test_split": None, **SPECS[args.spec], **overrides})
        trainer = build_trainer(cfg)
        prompts = held_out_prompts(args.spec, args.eval_prompts, trainer.processing_class)
        measure(0)
        trainer.add_callback(Probe())
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
    return {"method": method, "seed": seed, "optimizer_steps": steps, "generations": gens * args.batch * steps,
            "oracle_calls": trainer.oracle_calls, "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1)}


def cached_run(method: str, seed: int, args) -> dict:
    """``run``, or its result cached under ``--out/runs`` (``--fresh`` re-runs). EGPO at ``--steps`` is the first half
    of ``egpo-epochs`` (same seed, same prompt batches, same updates: the two curves agree to the digit), so when
    both are asked for, ``egpo`` is read off ``egpo-epochs``'s run instead of training it again."""
    path = os.path.join(args.out, "runs", f"{method}-s{seed}.json")
    if os.path.exists(path) and not args.fresh:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    if method == "egpo" and "egpo-epochs" in args.methods:
        full = cached_run("egpo-epochs", seed, args)
        r = {**full, "method": "egpo", "optimizer_steps": args.steps, "read_off": "egpo-epochs",
             "generations": full["generations"] // 2, "oracle_calls": full["oracle_calls"] // 2,
             "curve": [p for p in full["curve"] if p["step"] <= args.steps]}
    else:
        r = run(method, seed, args)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(r, fh)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=int, default=3, choices=(2, 3))
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps (egpo-epochs: twice as many)")
    ap.add_argument("--eval-every", type=int, default=8, help="optimizer steps between measurements (even)")
    ap.add_argument("--batch", type=int, default=32, help="prompts a step")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["online_dpo", "online_ipo", "egpo"], choices=list(METHODS))
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16, help="completions a held-out prompt")
    ap.add_argument("--out", default="outputs/bench_egpo")
    ap.add_argument("--fresh", action="store_true", help="re-run runs cached under --out/runs")
    args = ap.parse_args()
    if args.eval_every % 2:
        ap.error("--eval-every: must be even (EGPO's iterate exists after full steps only)")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            r = cached_run(method, seed, args)
            runs.append(r)
            print(f"{method} seed {seed} ({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s): " + "  ".join(
                f"{p['step']}:{p['exploitability']:.3f}" for p in r["curve"]), flush=True)
            with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
                json.dump({"args": vars(args), "runs": runs}, fh, indent=1)
    report(runs, args)


def sampling_floor(samples: int, draws: int = 20000) -> float:
    """What the exploitability estimate reads for the exact equilibrium (⅓ a class) from ``samples`` completions a
    prompt: the max over classes of a noisy estimate is biased up (0.107 at 16 samples)."""
    import random

    rng, total = random.Random(0), 0.0
    for _ in range(draws):
        drawn = [rng.randrange(3) for _ in range(samples)]
        q = [drawn.count(c) / samples for c in range(3)]
        total += max(q[(c - 1) % 3] + 0.5 * q[c] for c in range(3)) - 0.5
    return total / draws


def report(runs: list[dict], args) -> None:
    from align.plots import pyplot

    plt = pyplot()
    floor = sampling_floor(args.samples)
    print(f"the equilibrium policy would read {floor:.3f} with {args.samples} samples a prompt (sampling bias)")
    print(f"\n`python scripts/bench_egpo.py --spec {args.spec} --steps {args.steps} --eval-every {args.eval_every} "
          f"--lr {args.lr} --seeds {' '.join(map(str, args.seeds))}`\n")
    print("| method | optimizer steps | generations | exploitability: start → last iterate (seeds) | mean (spread) | "
          "lowest on the curve (mean) | class shares 0/1/2/none (mean, last) |")
    print("|---|---:|---:|---|---:|---:|---|")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, method in enumerate(args.methods):
        mine = [r for r in runs if r["method"] == method]
        last = [r["curve"][-1]["exploitability"] for r in mine]
        low = statistics.fmean(min(p["exploitability"] for p in r["curve"]) for r in mine)
        shares = "/".join(f"{statistics.fmean(r['curve'][-1][f'share_{c}'] for r in mine):.2f}"
                          for c in (0, 1, 2, None))
        print(f"| {method} | {mine[0]['optimizer_steps']} | {mine[0]['generations']} | "
              f"{mine[0]['curve'][0]['exploitability']:.3f} → {', '.join(f'{x:.3f}' for x in last)} | "
              f"**{statistics.fmean(last):.3f}** ({max(last) - min(last):.3f}) | {low:.3f} | {shares} |")
        for ax, key in zip(axes, ("step", "generations")):
            for r in mine:
                ax.plot([p[key] for p in r["curve"]], [p["exploitability"] for p in r["curve"]], color=f"C{i}",
                        alpha=0.3, lw=1)
            points = len(mine[0]["curve"])
            ax.plot([mine[0]["curve"][j][key] for j in range(points)],
                    [statistics.fmean(r["curve"][j]["exploitability"] for r in mine) for j in range(points)],
                    color=f"C{i}", lw=2.5 if method != "egpo" else 5, label=method, zorder=2 if method == "egpo" else 3,
                    alpha=0.5 if method == "egpo" else 1)
    for ax, label in zip(axes, ("optimizer steps", "generations")):
        ax.set_xlabel(label)
        ax.set_ylabel("exploitability (cyclic oracle)")
        ax.axhline(floor, color="grey", lw=1, ls="--", label="equilibrium, as measured")
        ax.legend()
    fig.suptitle(f"last-iterate exploitability, testbed spec {args.spec}, {len(args.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "exploitability.png"), dpi=110)
    print(f"wrote {args.out}/exploitability.png and results.json")


if __name__ == "__main__":
    main()
