"""``align quickstart``: the whole path on the embedded tiny model, in a few minutes on a laptop CPU.

1. Testbed: tokenizer + random tiny Llama, built locally (or reused from the cache).
2. SFT warm-up of that model on synthetic arithmetic (part of the testbed build, cached with it).
3. Alignment: the SFT policy answers 768 training prompts 4 times (sampling); the verifier turns its
   right and wrong answers into preference pairs; RPO (DPO + an SFT term on the chosen answer,
   ``configs/dpo/quickstart.yaml``) trains on them.

Held-out accuracy is printed before and after each stage; ``metrics.jsonl``, ``training_curves.png``
and ``summary.json`` are written into the output folder, the aligned model with its card (``README.md``) and plots into
its ``dpo/`` folder (``outputs/quickstart`` under the current folder by
default). The config comes from the shipped configs (:mod:`align.shipped`), so it runs from any folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

PAIR_PROMPTS = 768
CURVES = ["sft/loss", "sft/mean_token_accuracy", "dpo/loss", "dpo/rewards/margins", "dpo/rewards/accuracies",
          "dpo/logps/chosen", "dpo/logps/rejected", "dpo/rpo/sft_nll", "dpo/eval_rewards/accuracies"]


def _row(name: str, acc: dict) -> str:
    tasks = "  ".join(f"{k.split('/')[1]} {v:6.1%}" for k, v in acc.items() if k.startswith("accuracy/"))
    return f"  {name:<16} accuracy {acc['accuracy']:6.1%}   format {acc['format']:6.1%}   {tasks}"


def write_verifier_pairs(policy, tokenizer, path: str | Path, progress: bool = False,
                         prompts: int | None = PAIR_PROMPTS, spec: int = 2, tasks=None, split: str = "train",
                         reference: bool = True) -> int:
    """The quickstart's preference pairs: the policy answers ``prompts`` training prompts 4 times (sampling,
    seed 0), the verifier judges each answer, and a right and a wrong answer of a prompt make a pair (the
    reference solution stands in when no sample is right; ``reference=False``: such prompts give none). Written as
    JSON lines to ``path``; returns the count. ``spec``: the testbed spec whose tasks (``tasks``, default its
    warm-up mix), prompts and completion length (16 new tokens for spec 2, 64 for spec 3) are used; ``split="test"``
    takes its held-out problems instead (``prompts=None``: all of them)."""
    from align.data.sampled_pairs import sampled_pairs
    from align.rewards.math import is_correct
    from align.testbed.build import warmup

    if spec == 3:
        from align.testbed.arith import rl_rows
        from align.testbed.spec3 import MAX_NEW_TOKENS as new_tokens
    else:
        from align.testbed.tasks import rl_rows

        new_tokens = 16
    rows = rl_rows(tuple(tasks or warmup(spec)["testbed_tasks"]), n=prompts, split=split, seed=1)
    fallback = (lambda r: r["solution"]) if reference else None
    pairs = sampled_pairs(policy, tokenizer, rows, is_correct, reference=fallback, k=4, max_new_tokens=new_tokens,
                          progress=progress)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    return len(pairs)


def quickstart(output_dir: str = "outputs/quickstart", align_steps: int | None = None,
               pair_prompts: int = PAIR_PROMPTS) -> dict:
    """Run the three stages into ``output_dir``; ``align_steps`` and ``pair_prompts`` shorten a smoke run."""
    from align.config import load_config
    from align.metrics import read_jsonl
    from align.modeling import load_model, load_tokenizer
    from align.plots import plot_metrics
    from align.recipe import finish_run, get_recipe
    from align.run_info import run_info
    from align.shipped import shipped_config
    from align.testbed.build import default_dir, ensure_testbed, held_out_accuracy

    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("[1/3] testbed: tokenizer + tiny Llama (built once, then cached)", flush=True)
    cached = (default_dir() / "testbed.json").is_file()
    tb = ensure_testbed()
    info = tb.info
    print(f"      {tb.root} ({info['parameters'] / 1e6:.2f}M parameters, built in {info['build_seconds']} s"
          f"{', reused' if cached else ''})")

    print("[2/3] SFT warm-up on synthetic arithmetic (part of the testbed build)", flush=True)
    acc = info["held_out_accuracy"]
    print(_row("random init", acc["base"]))
    print(_row("after SFT", acc["policy"]))

    print("[3/3] alignment: pairs from the policy's own samples, judged by the verifier; then RPO = DPO + SFT "
          "on the chosen answer (configs/dpo/quickstart.yaml)", flush=True)
    policy, tokenizer = load_model(str(tb.policy)), load_tokenizer(str(tb.policy))
    n = write_verifier_pairs(policy, tokenizer, out / "pairs.jsonl", progress=True, prompts=pair_prompts)
    print(f"      {n} pairs from {pair_prompts} prompts x 4 samples -> {out / 'pairs.jsonl'}")
    overrides = {"output_dir": str(out / "dpo"), "overwrite_output_dir": True, "dataset_name": str(out / "pairs.jsonl")}
    if align_steps:
        overrides["max_steps"] = align_steps
    dpo = get_recipe("dpo")  # by name: the library does not import the recipes package
    config = load_config(dpo.config_class, shipped_config("dpo", "quickstart.yaml"), overrides)
    (out / "dpo" / config.metrics_file).unlink(missing_ok=True)
    started = time.perf_counter()
    result = dpo.run(config)
    # the end every `align train` run has: plots and the model card of the aligned model (no push)
    argv = ["--config", "quickstart", *(f"{k}={v}" for k, v in overrides.items())]
    finish_run(config.output_dir, config, result, run_info("dpo", argv, config, result, time.perf_counter() - started))
    aligned = held_out_accuracy(load_model(config.output_dir), load_tokenizer(config.output_dir), progress=True)
    print(_row("after SFT", acc["policy"]))
    print(_row(f"after {config.objective.upper()}", aligned))
    print(f"  held-out synthetic preference pairs: reward accuracy {result['eval_rewards/accuracies']:.1%}, "
          f"margin {result['eval_rewards/margins']:.3f} (both 0 before training)")

    records = [{**r, "stage": "sft"} for r in read_jsonl(str(tb.policy / "metrics.jsonl"))]
    offset = max((r["step"] for r in records), default=0)
    dpo_records = read_jsonl(str(out / "dpo" / "metrics.jsonl"))
    records += [{**r, "stage": "dpo", "step": r["step"] + offset} for r in dpo_records]
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    plotted = [{"step": r["step"], **{f"{r['stage']}/{k}": v for k, v in r.items() if k not in ("step", "stage")}}
               for r in records]
    plot_metrics(plotted, str(out / "training_curves.png"), keys=CURVES, title="align quickstart (tiny testbed)")
    summary = {
        "held_out_accuracy": {"random_init": acc["base"], "sft": acc["policy"], config.objective: aligned},
        "held_out_preferences": {k: v for k, v in result.items() if k.startswith("eval_rewards/")},
        "seconds": round(time.perf_counter() - t0, 1),
        "testbed": str(tb.root),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(tb.root / "testbed.json", out / "testbed.json")
    print(f"done in {summary['seconds']} s: {out}/metrics.jsonl, {out}/training_curves.png, {out}/summary.json")
    return summary
