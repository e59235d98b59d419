"""Benchmark: align's PreferenceTrainer against TRL's DPOTrainer, same tiny model, data, batch and steps.

    python scripts/bench_dpo.py [--steps 40] [--batch 16] [--repeats 1]

Each (tool, setting) runs in its own child process (so peak RSS is that run's own) within this one
job, one after the other, and the parent prints tokens/s, s/step and peak RSS for each, with ratios.

Settings:
* ``identical``: fp32, no gradient checkpointing, live reference model for both (TRL's default
  reference mode), same learning rate, beta and max_length;
* ``default``: each tool's own defaults on this machine for precision, checkpointing and reference
  (TRL on a CPU: use_cpu with its bf16 and gradient-checkpointing defaults, live reference; align:
  fp32, no checkpointing, reference log-probs precomputed once, with that pass counted in the time).

tokens/s counts the non-padding tokens of chosen and rejected sequences trained on, divided by the
wall time of ``trainer.train()`` (which includes align's precomputation pass).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _bench import peak_rss_mib, run_children, step_timer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BETA, LR, MAX_LENGTH = 0.1, 5e-4, 64


def _dataset(n: int):
    from align.testbed.tasks import dataset

    return dataset("preference", n=n, split="train", seed=0)


def _tokens(rows, tokenizer) -> int:
    """Non-padding tokens of the 2 sequences (prompt + chosen, prompt + rejected) of each row."""
    from align.data.preference import tokenize_preferences

    tok = tokenize_preferences(rows, tokenizer, MAX_LENGTH)
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(tok["prompt_ids"], tok["chosen_ids"],
                                                                   tok["rejected_ids"], strict=True))


def child(tool: str, setting: str, steps: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.testbed.build import ensure_testbed

    torch.manual_seed(0)
    path = str(ensure_testbed(progress=False).policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = _dataset(steps * batch)
    out = f"/tmp/align-bench-{tool}-{setting}-{os.getpid()}"
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
                  beta=BETA, max_length=MAX_LENGTH, logging_steps=steps, save_strategy="no", report_to="none",
                  disable_tqdm=True, seed=0, lr_scheduler_type="constant", dataloader_pin_memory=False)
    timer = step_timer()
    if tool == "trl":
        from trl import DPOConfig, DPOTrainer

        extra = dict(use_cpu=True)
        if setting == "identical":
            extra.update(bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=False)
        config = DPOConfig(**common, **extra)
        model = AutoModelForCausalLM.from_pretrained(path)
        trainer = DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        from align.trainers import PreferenceConfig, PreferenceTrainer

        extra = dict(precompute_ref_logps=setting != "identical")
        config = PreferenceConfig(**common, **extra)
        model = AutoModelForCausalLM.from_pretrained(path)
        trainer = PreferenceTrainer(model, config, rows, processing_class=tokenizer, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steady = timer.times[2:]  # skip the first steps (allocation, warm-up)
    s_per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    return {"tool": tool, "setting": setting, "tokens_per_s": _tokens(rows, tokenizer) / wall, "s_per_step": s_per_step,
            "wall_s": wall, "peak_rss_mib": peak_rss_mib(), "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(config.gradient_checkpointing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (tool, setting); the best is kept")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.steps, args.batch)), flush=True)
        return

    from align.testbed.build import ensure_testbed

    ensure_testbed()  # build outside the timed children
    results = run_children(__file__, ("identical", "default"), args.repeats,
                           ["--steps", str(args.steps), "--batch", str(args.batch)],
                           better=lambda new, old: new["tokens_per_s"] > old["tokens_per_s"])
    print(f"\nDPO, tiny testbed Llama ({args.steps} steps, batch {args.batch}, max_length {MAX_LENGTH}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'setting':<10} {'tool':<6} {'tokens/s':>9} {'s/step':>8} {'peak RSS MiB':>13}  precision / checkpointing")
    for (tool, setting), r in results.items():
        print(f"{setting:<10} {tool:<6} {r['tokens_per_s']:>9.0f} {r['s_per_step']:>8.3f} {r['peak_rss_mib']:>13.0f}  "
              f"{'bf16' if r['bf16'] else 'fp32'} / {'on' if r['gradient_checkpointing'] else 'off'}")
    for setting in ("identical", "default"):
        a, t = results[("align", setting)], results[("trl", setting)]
        print(f"{setting}: throughput align/TRL = {a['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
              f"s/step TRL/align = {t['s_per_step'] / a['s_per_step']:.2f}x, "
              f"peak RSS align/TRL = {a['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
