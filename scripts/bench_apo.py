"""Evidence: does APO (iterative DPO with the extrapolated reference, ``apo_alpha``) reach plain iterative DPO's
iteration-(t+1) win rate at iteration t? Issue 19 point 3, "APO vs plain iterative DPO: win rate per iteration".

    python scripts/bench_apo.py [--spec 3] [--seeds 0 1 2] [--alphas 0 0.5 0.9] [--out outputs/bench_apo]

Runs ``configs/iterative/testbed-apo.yaml`` (96 prompts, K = 4, oracle ``reward:accuracy_and_length`` scale 0.1, 20
steps of 16 pairs a round with ``objective: dpo`` at lr 3e-4, 3 iterations, win rate against the initial policy on
64 held-out prompts x 4 samples) once per ``apo_alpha`` and seed (the config's ``seed``: training prompts, samples,
win-rate draws), one run after the other in this process (``OMP_NUM_THREADS=1``). ``apo_alpha`` 0 is plain iterative
DPO; iteration 1 is the same round for every α (there is no previous policy yet), so APO can differ from iteration 2
on. ``--spec 3`` (default) makes the same changes as ``scripts/bench_iterative_length.py --spec 3``
(``testbed:v3-policy``, sub2d + mul2d, 64-token completions, ``max_length`` 128) and keeps the config's lr 3e-4: plain
DPO's win rate climbs above 0.5 with it on spec 3 (0.456 / 0.882 / 0.985, seed 0), so there was nothing to re-tune.
``--spec 2``: the config as shipped.

Prints, with the command line: one markdown table per quantity (win rate, held-out length, held-out accuracy of 8
samples at temperature 1 and greedy; per seed, mean, spread = max - min over seeds) and the comparison the claim is
about: APO's win rate after iteration t against plain DPO's after t and after t + 1, per seed and on the means.
Writes ``results.json`` and ``apo_win_rate.png`` under ``--out``. Exits 0 whatever the answer (a report, not a check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from bench_iterative_length import (
    METRICS,
    REPO,
    command_line,
    common_arguments,
    curve,
    initial_accuracy,
    overrides,
    plot,
    print_tables,
    print_times,
    run_once,
    summary,
    write_json,
)

CONFIG = os.path.join(REPO, "configs", "iterative", "testbed-apo.yaml")
LEARNING_RATE = {2: None, 3: None}  # the config's 3e-4 on both specs


def name(alpha: float) -> str:
    return f"apo_alpha={alpha:g}"


def speed_up(results: dict[str, list[dict]], alphas: list[float], seeds: list[int], initial: dict) -> list[dict]:
    """Per α > 0 and iteration t < T: APO's win rate after t, plain DPO's after t and after t + 1, per seed (the
    same seed's runs are paired: same prompts, same first round, same win-rate draws) and their means."""
    plain = [curve(r, "eval/win_rate", initial) for r in results[name(0.0)]]
    rows = []
    for alpha in alphas:
        if alpha == 0:
            continue
        apo = [curve(r, "eval/win_rate", initial) for r in results[name(alpha)]]
        for t in range(1, len(plain[0]) - 1):
            ahead = [a[t] - p[t + 1] for a, p in zip(apo, plain, strict=True)]
            same = [a[t] - p[t] for a, p in zip(apo, plain, strict=True)]
            rows.append({
                "alpha": alpha, "t": t, "apo_t": [a[t] for a in apo], "plain_t": [p[t] for p in plain],
                "plain_t1": [p[t + 1] for p in plain], "apo_t_minus_plain_t1": ahead, "apo_t_minus_plain_t": same,
                "reached": sum(d >= 0 for d in ahead), "seeds": seeds,
                "mean_apo_t": statistics.fmean(a[t] for a in apo),
                "mean_plain_t1": statistics.fmean(p[t + 1] for p in plain)})
    return rows


def print_speed_up(rows: list[dict]) -> None:
    def seeds(values: list[float], fmt: str = "{:+.3f}") -> str:
        return ", ".join(fmt.format(v) for v in values)

    print("\nIs iteration t+1's win rate reached at iteration t? APO after t vs plain iterative DPO (apo_alpha=0) "
          "after t + 1 (per seed; mean; spread = max - min)\n")
    print("| α | t | APO win after t | plain DPO after t | plain DPO after t+1 | APO(t) − DPO(t+1) | mean | spread "
          "| APO(t) − DPO(t), mean | seeds reaching DPO(t+1) |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        ahead, same = r["apo_t_minus_plain_t1"], r["apo_t_minus_plain_t"]
        print(f"| {r['alpha']:g} | {r['t']} | {seeds(r['apo_t'], '{:.3f}')} | {seeds(r['plain_t'], '{:.3f}')} | "
              f"{seeds(r['plain_t1'], '{:.3f}')} | {seeds(ahead)} | {statistics.fmean(ahead):+.3f} | "
              f"{max(ahead) - min(ahead):.3f} | {statistics.fmean(same):+.3f} | {r['reached']}/{len(ahead)} |")
    later = [r for r in rows if r["t"] >= 2]  # t = 1: APO's first round is plain DPO's by construction
    if later:
        faster = [r for r in later if r["mean_apo_t"] >= r["mean_plain_t1"]]
        print(f"\nanswer (t >= 2, seed means): APO reaches plain DPO's next-iteration win rate in {len(faster)} of "
              f"{len(later)} (α, t) cases: " + "; ".join(
                  f"α {r['alpha']:g}, t {r['t']}: {r['mean_apo_t']:.3f} vs {r['mean_plain_t1']:.3f}" for r in later))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "outputs/bench_apo")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                        help="apo_alpha values; 0 (plain iterative DPO) is always run (default 0 0.5 0.9)")
    args = parser.parse_args(argv)
    alphas = sorted({0.0, *args.alphas})
    over = overrides(args, LEARNING_RATE)
    print(command_line(), flush=True)
    initial = initial_accuracy(CONFIG, over, args.out)
    results: dict[str, list[dict]] = {name(a): [] for a in alphas}
    for seed in args.seeds:
        for alpha in alphas:
            out = os.path.join(args.out, f"seed{seed}", f"alpha{alpha:g}")
            r = run_once(CONFIG, out, {**over, "apo_alpha": alpha, "seed": seed})
            results[name(alpha)].append(r)
            wins = " / ".join(f"{x['eval/win_rate']:.3f}" for x in r["records"])
            print(f"α {alpha:g} seed {seed}: {r['cpu_s']:.0f} CPU-s, {r['wall_s']:.0f} s wall; win rates {wins}",
                  flush=True)

    baseline = statistics.fmean(r["records"][0]["eval/baseline_length"] for r in results[name(0.0)])
    print(f"\n{command_line()}\n\nspec {args.spec}, config {os.path.relpath(CONFIG, REPO)}, overrides "
          f"{json.dumps(over)}; initial policy: {baseline:.2f} tokens (mean over seeds), greedy accuracy "
          f"{initial['eval/greedy_accuracy']:.3f}, sampled {initial['eval/sampled_accuracy']:.3f}")
    print_tables(results, args.seeds, initial)
    rows = speed_up(results, alphas, args.seeds, initial)
    print_speed_up(rows)
    print_times(results, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "apo_win_rate.png")
    plot(results, initial, f"spec {args.spec}: APO (apo_alpha) vs plain iterative DPO (0), seeds {args.seeds}", png)
    write_json(os.path.join(args.out, "results.json"), {
        "command": command_line(), "spec": args.spec, "seeds": args.seeds, "alphas": alphas, "overrides": over,
        "config": CONFIG, "initial": {"length": baseline, **initial},
        "runs": {n: [{"seed": s, **r} for s, r in zip(args.seeds, runs, strict=True)] for n, runs in results.items()},
        "summary": {n: {k: summary(runs, k, initial) for k, *_ in METRICS} for n, runs in results.items()},
        "speed_up": rows})
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
