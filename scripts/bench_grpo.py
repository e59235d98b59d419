"""Benchmark: align's RLTrainer (GRPO, uniform allocator) against TRL's GRPOTrainer, same tiny model and data.

    python scripts/bench_grpo.py [--steps 20] [--prompts 16] [--generations 8] [--repeats 1]

Both tools train the warmed-up testbed policy on the same testbed arithmetic prompts (add1, sub1, mul1,
conversational, chat template applied), with the same reward (``rewards.math.accuracy_reward``), the same
group size, completion length (16 new tokens), temperature 1.0, learning rate, loss (``dapo``
aggregation, ε = 0.2, β = 0) and the same work per round: ``--prompts`` prompts x ``--generations``
completions generated with HF ``generate``, then 2 optimizer steps on half of them each. In TRL terms:
``per_device_train_batch_size = prompts x generations / 2`` completions, ``steps_per_generation = 2``;
in align's: ``per_device_train_batch_size = prompts``, ``num_minibatches = 2``. Both therefore compute
old log-probs once per round (the policy moves before the round's second step).

Each (tool, setting) runs in its own child process of this one job (so peak RSS is that run's own), and
the parent prints s/step, rollouts/s and peak RSS for each, with ratios.

Settings:
* ``identical``: fp32 and no gradient checkpointing for both;
* ``default``: each tool's own defaults on this machine for precision and checkpointing (TRL on a CPU:
  ``use_cpu`` with its bf16 and gradient-checkpointing defaults; align: fp32, no checkpointing, which
  are its defaults, so its ``default`` run is a second measurement of the same configuration).

s/step is the steady-state mean over optimizer steps after the first round (which includes allocation
and warm-up); wall time covers the whole ``trainer.train()``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _bench import peak_rss_mib, run_children, step_timer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LR, MAX_NEW, TASKS = 1e-4, 16, ("add1", "sub1", "mul1")
UPDATES_PER_ROUND = 2


def child(tool: str, setting: str, steps: int, prompts: int, generations: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.rewards.math import accuracy_reward
    from align.testbed.build import ensure_testbed
    from align.testbed.tasks import dataset

    torch.manual_seed(0)
    path = str(ensure_testbed(progress=False).policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rounds = steps // UPDATES_PER_ROUND
    rows = dataset("rl", TASKS, n=max(prompts * rounds, 64), split="train", seed=0)
    out = f"/tmp/align-bench-grpo-{tool}-{setting}-{os.getpid()}"
    common = dict(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", seed=0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, num_generations=generations,
                  max_completion_length=MAX_NEW, temperature=1.0, beta=0.0, loss_type="dapo", epsilon=0.2,
                  num_iterations=1, dataloader_pin_memory=False)
    timer = step_timer()
    model = AutoModelForCausalLM.from_pretrained(path)
    if tool == "trl":
        from trl import GRPOConfig, GRPOTrainer

        extra = dict(use_cpu=True)
        if setting == "identical":
            extra.update(bf16=False, gradient_checkpointing=False)
        config = GRPOConfig(**common, **extra, per_device_train_batch_size=prompts * generations // UPDATES_PER_ROUND,
                            steps_per_generation=UPDATES_PER_ROUND)
        trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=config, train_dataset=rows,
                              processing_class=tokenizer, callbacks=[timer])
    else:
        from align.trainers.rl import RLTrainer
        from align.trainers.rl_args import RLConfig

        extra = {"micro_batch_size": prompts * generations // UPDATES_PER_ROUND} if setting == "identical" else {}
        config = RLConfig(**common, **extra, per_device_train_batch_size=prompts, num_minibatches=UPDATES_PER_ROUND,
                          allocator="uniform", reward_funcs=["accuracy"], max_prompt_length=64)
        trainer = RLTrainer(model, config, rows, processing_class=tokenizer, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steady = timer.times[UPDATES_PER_ROUND - 1 :]  # from the end of the first round
    s_per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    return {"tool": tool, "setting": setting, "s_per_step": s_per_step, "wall_s": wall,
            "rollouts_per_s": prompts * generations * rounds / wall, "peak_rss_mib": peak_rss_mib(),
            "mean_reward": sum(timer.rewards) / max(len(timer.rewards), 1), "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(config.gradient_checkpointing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (2 per round)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per round")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (tool, setting); the fastest is kept")
    parser.add_argument("--settings", nargs="+", default=["identical", "default"], choices=["identical", "default"])
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 * UPDATES_PER_ROUND or args.steps % UPDATES_PER_ROUND:
        parser.error(f"--steps must be an even number >= {2 * UPDATES_PER_ROUND} ({UPDATES_PER_ROUND} steps a round)")
    if (args.prompts * args.generations) % UPDATES_PER_ROUND:
        parser.error("--prompts x --generations must be even (the round is split into 2 optimizer steps)")
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.steps, args.prompts, args.generations)), flush=True)
        return

    from align.testbed.build import ensure_testbed

    ensure_testbed()  # build outside the timed children
    child_args = ["--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations)]
    results = run_children(__file__, args.settings, args.repeats, child_args,
                           better=lambda new, old: new["s_per_step"] < old["s_per_step"])
    print(f"\nGRPO, tiny testbed Llama ({args.steps} steps, {args.prompts} prompts x {args.generations} completions "
          f"a round, {MAX_NEW} new tokens, {os.cpu_count()} CPUs)")
    print(f"{'setting':<10} {'tool':<6} {'s/step':>8} {'rollouts/s':>11} {'peak RSS MiB':>13} {'reward':>7}  "
          "precision / checkpointing")
    for (tool, setting), r in results.items():
        print(f"{setting:<10} {tool:<6} {r['s_per_step']:>8.3f} {r['rollouts_per_s']:>11.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['mean_reward']:>7.3f}  {'bf16' if r['bf16'] else 'fp32'} / "
              f"{'on' if r['gradient_checkpointing'] else 'off'}")
    for setting in args.settings:
        a, t = results[("align", setting)], results[("trl", setting)]
        print(f"{setting}: speed (s/step TRL/align) = {t['s_per_step'] / a['s_per_step']:.2f}x, "
              f"wall TRL/align = {t['wall_s'] / a['wall_s']:.2f}x, "
              f"peak RSS align/TRL = {a['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
