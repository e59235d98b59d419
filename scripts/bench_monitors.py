"""Gradient-entanglement monitor: its training overhead, and whether the mitigations keep chosen log-probs up.

    python scripts/bench_monitors.py [--steps 100] [--every 50] [--probe 64] [--repeats 2] [--skip-mitigation]

1. Overhead: DPO on the testbed's synthetic pairs (batch 16, the testbed config), the monitor off vs on at
   the default cadence (every ``--every`` steps on ``--probe`` held-out pairs, lm_head subset, plus the check
   before the first step). Runs alternate off/on ``--repeats`` times in this one process; the fastest of
   each is kept and the ratio printed. Target: at most 10% slower.
2. Mitigation (docs/methods.md §12.3): the same DPO run (seed, steps, data) plain, with ``entanglement_action``
   ``downweight`` (0.5) and ``drop`` on pairs the batch predicts 'both down' (lm_head subset), and with the
   ``pairnorm`` objective (pairwise-normalised gradient). Prints the held-out chosen and rejected log-probs,
   the preference accuracy and margin after training, and the monitor's 'both down' share.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
CONFIG = Path(__file__).resolve().parents[1] / "configs/dpo/testbed.yaml"


def train(tmp: str, name: str, steps: int, **over) -> tuple[float, dict, object]:
    from align.config import load_config
    from align.recipes.dpo import DPORecipeConfig, build_trainer

    config = load_config(DPORecipeConfig, CONFIG, {"output_dir": f"{tmp}/{name}", "max_steps": steps,
                                                   "disable_tqdm": True, "logging_steps": steps, **over})
    trainer = build_trainer(config)
    trainer.evaluate()  # reference log-probs of the eval set computed outside the timed part
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / steps, trainer.evaluate(), trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-mitigation", action="store_true")
    args = parser.parse_args()
    monitor = {"entanglement_steps": args.every, "entanglement_probe_size": args.probe}
    with tempfile.TemporaryDirectory() as tmp:
        best = {"off": float("inf"), "on": float("inf")}
        for r in range(args.repeats):
            for name, over in (("off", {}), ("on", monitor)):
                s, _, _ = train(tmp, f"{name}-{r}", args.steps, **over)
                best[name] = min(best[name], s)
                print(f"overhead run {r}: monitor {name}: {s:.4f} s/step", flush=True)
        print(f"\nmonitor overhead (every {args.every} steps, {args.probe} probe pairs, lm_head): "
              f"{best['on']:.4f} vs {best['off']:.4f} s/step = {best['on'] / best['off']:.3f}x "
              f"({100 * (best['on'] / best['off'] - 1):+.1f}%; target <= +10%)")
        if args.skip_mitigation:
            return
        runs = {"dpo": {}, "dpo+downweight": {"entanglement_action": "downweight"},
                "dpo+drop": {"entanglement_action": "drop"}, "pairnorm": {"objective": "pairnorm"}}
        print(f"\nmitigation, {args.steps} steps, same seed and data; held-out pairs after training:")
        print(f"{'run':<16} {'logps/chosen':>12} {'logps/rejected':>14} {'accuracy':>9} {'margin':>7} "
              f"{'both_down (probe)':>18}")
        for name, over in runs.items():
            _, ev, trainer = train(tmp, name, args.steps, **monitor, **over)
            logged = [r for r in trainer.state.log_history if "entanglement/both_down" in r]
            down = logged[-1]["entanglement/both_down"] if logged else float("nan")
            print(f"{name:<16} {ev['eval_logps/chosen']:>12.3f} {ev['eval_logps/rejected']:>14.3f} "
                  f"{ev['eval_rewards/accuracies']:>9.3f} {ev['eval_rewards/margins']:>7.3f} {down:>18.3f}", flush=True)


if __name__ == "__main__":
    main()
