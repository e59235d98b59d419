"""The GPU check (issue 15): align against TRL 1.16 on a config-built model of Qwen2.5-0.5B's shape in bf16, DPO and
GRPO (HF ``generate``) for a few steps each, in one process and under FSDP2 with one process.

    scripts/gpu_check.sh [--wheels DIR] [--shape 0.5b|1.5b] [--peak-tflops 989]   # on a GPU, no network
    scripts/gpu_check.sh --cpu --tiny                                             # the CPU path (seconds)

The shell wrapper installs the carried wheels (TRL and what the GPU image lacks) and runs this file with the checkout
on ``PYTHONPATH``. The model is built from its config values written out here (no download), random weights, saved
once with the testbed tokenizer (its 384 ids are valid in the larger vocabulary). Every run uses the same settings:
float32 master weights with bf16 autocast (align's default for ``torch_dtype: bfloat16``; TRL given the same),
AdamW at the same learning rate, no gradient checkpointing, the same random-text data, the same reward.

* DPO: ``--dpo-pairs`` pairs a step of a 64-token prompt and two completions, reference log-probs precomputed by
  both (not timed: steady state only).
* GRPO: ``--grpo-prompts`` prompts x ``--grpo-generations`` completions of up to ``--grpo-tokens`` tokens a step,
  sampled with HF ``generate`` at temperature 1, beta 0, the ``dapo`` loss, one update a round.

Tools: ``trl``, ``align`` and, in one process only, ``align-pf`` (align with ``padding_free``: packed sequences with
``position_ids``, issue 18, on the attention the model loads with). Each (tool, launch) runs in its own child
process: ``single`` is ``python``, ``fsdp2`` is ``accelerate launch`` with
configs/accelerate/fsdp2.yaml for one process. Per run: tokens/s (prompt + completion tokens trained a step over the
mean wall time of the steps after the first; GRPO's step includes its generation), MFU (model FLOPs: 6 N a trained
token, plus 2 N a generated or prompt token for GRPO's sampling, N = every parameter but the input embedding counted
once; attention's own FLOPs left out; over ``--peak-tflops``), and peak GPU memory (``torch.cuda.max_memory_allocated``
of that run). Ratios are align / TRL at the same launch. A run that fails or is refused is one line, and the check
goes on. align under ``fsdp2`` must be sharded by align itself (``fully_shard``, align/fsdp2.py: the path the RL loop
and EGPO take on GPUs) and give the one-process losses at every step (to 0.02: bf16 autocast). The exit status is
non-zero when any run failed or that check did not hold (a refusal is not a failure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mount_checkout() -> None:
    """Run align from this checkout, installed or not: pyproject maps ``align.rewards`` and ``align.recipes`` to the
    top-level rewards/ and recipes/, which a bare ``PYTHONPATH=<checkout>`` does not; a folder of two links to them
    joins align's package path (and wins over another installed copy's)."""
    import align

    if os.path.isdir(os.path.join(os.path.dirname(align.__file__), "rewards")):
        return  # an installed tree, or one that has them already
    shim = os.path.join(tempfile.gettempdir(), f"align-checkout-{zlib.crc32(REPO.encode()):08x}")
    os.makedirs(shim, exist_ok=True)
    for name in ("rewards", "recipes"):
        link = os.path.join(shim, name)
        if not os.path.islink(link):
            os.symlink(os.path.join(REPO, name), link)
    align.__path__.append(shim)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, REPO)
mount_checkout()
from _bench import step_timer  # noqa: E402
from bench_memory import peak_memory_mib  # noqa: E402
from gpu_report import TOOLS, consistency, figures, report  # noqa: E402,F401 (figures: the tests read it here)
from gpu_setup import PROMPT_TOKENS, SETTINGS, build_model, lengths, reward, write_data  # noqa: E402

LR, BETA = 1e-6, 0.1


def common(tool: str, out: str, steps: int, cpu: bool) -> dict:
    return dict(output_dir=out, max_steps=steps, learning_rate=LR, logging_steps=1, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=0, lr_scheduler_type="constant", bf16=not cpu,
                gradient_checkpointing=False, dataloader_pin_memory=False, use_cpu=cpu)


def align_trainer(method: str, folder: str, s: dict, out: str, cpu: bool, padding_free: bool = False):
    """align's own recipe path: the config through load_config (every check, the launcher's too), build_trainer;
    ``padding_free``: packed sequences, no padding (the model's default attention: sdpa on the GPU machine)."""
    from align.config import load_config

    if method == "dpo":
        from align.recipes.dpo import RECIPE, build_trainer

        keys = dict(dataset_name=f"{folder}/dpo.jsonl", per_device_train_batch_size=s["dpo_pairs"], beta=BETA,
                    max_length=lengths(folder)["max_length"])
    else:
        from align.recipes.grpo import RECIPE, build_trainer

        n = s["grpo_prompts"] * s["grpo_generations"]
        keys = dict(dataset_name=f"{folder}/grpo.jsonl", per_device_train_batch_size=s["grpo_prompts"],
                    num_generations=s["grpo_generations"], max_prompt_length=lengths(folder)["max_prompt"] * 2,
                    max_completion_length=s["grpo_tokens"], beta=0.0, loss_type="dapo",
                    reward_funcs=["gpu_setup:reward"], temperature=1.0, generation_batch_size=n,
                    micro_batch_size=n, rollout="hf", eval_num_samples=0)
    steps = s["dpo_steps"] if method == "dpo" else s["grpo_steps"]
    base = {k: v for k, v in common("align", out, steps, cpu).items() if k != "use_cpu" or v}
    config = load_config(RECIPE.config_class, None, {**base, **keys, "model_name_or_path": folder,
                                                     "torch_dtype": "float32" if cpu else "bfloat16",
                                                     "dataset_test_split": None, "overwrite_output_dir": True,
                                                     "padding_free": padding_free})
    return build_trainer(config)


def trl_trainer(method: str, folder: str, s: dict, out: str, cpu: bool):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # float32 master weights, bf16 autocast
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = load_dataset("json", data_files=f"{folder}/dpo.jsonl", split="train")
        config = DPOConfig(**common("trl", out, s["dpo_steps"], cpu), per_device_train_batch_size=s["dpo_pairs"],
                           beta=BETA, max_length=lengths(folder)["max_length"], precompute_ref_log_probs=True)
        return DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tok)
    from trl import GRPOConfig, GRPOTrainer

    rows = load_dataset("json", data_files=f"{folder}/grpo.jsonl", split="train")
    n = s["grpo_prompts"] * s["grpo_generations"]
    config = GRPOConfig(**common("trl", out, s["grpo_steps"], cpu), per_device_train_batch_size=n,
                        num_generations=s["grpo_generations"], steps_per_generation=1,
                        max_completion_length=s["grpo_tokens"], beta=0.0, loss_type="dapo", temperature=1.0,
                        use_vllm=False)
    return GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=rows, processing_class=tok)


def run_one(tool: str, method: str, folder: str, s: dict, cpu: bool) -> dict:
    """One (tool, method) run in this process: steady-state seconds a step, tokens a step, peak memory."""
    import torch

    from align.errors import AlignError

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = tempfile.mkdtemp(prefix=f"gpu-check-{tool}-{method}-")
    try:
        if tool == "trl":
            trainer = trl_trainer(method, folder, s, out, cpu)
        else:
            trainer = align_trainer(method, folder, s, out, cpu, padding_free=tool == "align-pf")
    except AlignError as err:
        return {"refused": str(err)}
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    times = timer.times
    s_per_step = (times[-1] - times[0]) / (len(times) - 1)
    if method == "dpo":
        tokens = lengths(folder)["dpo_tokens_per_step"]
        generated = 0.0
    else:  # every completion runs to max_completion_length: a random model over 151,936 ids almost never samples EOS
        g = s["grpo_generations"]  # each completion is trained (and was sampled) after its prompt
        tokens = g * lengths(folder)["grpo_prompt_tokens_per_step"] + g * s["grpo_prompts"] * s["grpo_tokens"]
        generated = tokens
    peak = peak_memory_mib()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    sharded = bool(getattr(trainer, "fsdp2", False))  # align's own fully_shard in effect (align/fsdp2.py)
    del trainer
    gc.collect()
    return {"s_per_step": s_per_step, "tokens": tokens, "generated": generated, "peak_mib": peak, "losses": losses,
            "sharded": sharded}


def child(tool: str, folder: str, s: dict, cpu: bool, which: list[str]) -> dict:
    results = {}
    for method in which:
        try:
            results[method] = run_one(tool, method, folder, s, cpu)
        except Exception as err:  # noqa: BLE001 -- one failed run is reported, the others still run
            results[method] = {"failed": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    return results


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fsdp2_config(folder: str) -> str:
    import yaml

    cfg = yaml.safe_load(open(os.path.join(REPO, "configs", "accelerate", "fsdp2.yaml"), encoding="utf-8"))
    cfg.update(num_processes=1, num_machines=1, machine_rank=0, mixed_precision="bf16")
    path = os.path.join(folder, "fsdp2-1proc.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def launch(tool: str, launcher: str, folder: str, args, deadline: float) -> dict:
    """``tool``'s runs in a child process (``single``: python; ``fsdp2``: accelerate launch, one process), given
    the time left before ``deadline`` (``time.monotonic()``) at most ``--child-timeout`` seconds."""
    which = args.which.split(",")
    left = deadline - time.monotonic()
    if left < 20:
        return {m: {"failed": "not run: the check's --budget-s was spent"} for m in which}
    budget = min(args.child_timeout, left)
    me = [os.path.abspath(__file__), "--child", tool, "--model-dir", folder, "--which", args.which,
          *(["--tiny"] if args.tiny else []), *(["--cpu"] if args.cpu else [])]
    if launcher == "single":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", fsdp2_config(folder),
               "--num_processes", "1", "--main_process_port", str(free_port()), *me]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {m: {"failed": f"timed out after {budget:.0f} s"} for m in which}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        return {m: {"failed": f"exit {proc.returncode}: {tail}"} for m in which}
    return json.loads(line[0][len("RESULT "):])


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU, in this process, one-process runs only")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few tokens (seconds on a CPU)")
    parser.add_argument("--shape", choices=("0.5b", "1.5b"), default="0.5b", help="the model's shape (Qwen2.5)")
    parser.add_argument("--which", default="dpo,grpo", help="comma-separated: dpo, grpo")
    parser.add_argument("--launchers", default="single,fsdp2", help="comma-separated: single, fsdp2 (GPU only)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for MFU (H100 / H200 SXM: 989); 0: no MFU")
    parser.add_argument("--child-timeout", type=int, default=240, help="seconds for each child process at most")
    parser.add_argument("--budget-s", type=int, default=450,
                        help="seconds for the whole check: a child that would start past it is not run")
    parser.add_argument("--json", metavar="OUT", help="also write the settings and results here")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child", metavar="TOOL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    which = [w for w in args.which.split(",") if w]
    if not which or set(which) - {"dpo", "grpo"}:
        parser.error(f"--which: comma-separated dpo / grpo, got {args.which!r}")
    s = SETTINGS["tiny" if args.tiny else "gpu"]
    if args.cpu:  # as on the GPU machine, which has no vLLM: TRL and align then never import it (a slow import)
        sys.modules.setdefault("vllm", None)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model_dir, s, args.cpu, which)), flush=True)
        return 0
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU here: run with --cpu (and --tiny) for the CPU path")
    launchers = ["single"] if args.cpu else [x for x in args.launchers.split(",") if x]
    shape = "tiny" if args.tiny else args.shape
    started = time.perf_counter()
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        n_params = build_model(folder, shape)
        write_data(folder, s)
        results = {}
        for launcher in launchers:
            for tool in (t for t in TOOLS if launcher == "single" or t != "align-pf"):  # TRL first: the ratios' base
                results[(tool, launcher)] = (child(tool, folder, s, True, which) if args.cpu
                                             else launch(tool, launcher, folder, args, deadline))
    device = torch.cuda.get_device_name() if not args.cpu else f"CPU ({os.cpu_count()} cores)"
    memory = "peak GPU memory allocated" if not args.cpu else "peak RSS of this process (cumulative)"
    peak = args.peak_tflops if not args.cpu and args.peak_tflops > 0 else None
    print(f"gpu_check: Qwen2-architecture model of shape {shape} ({n_params / 1e6:.1f}M parameters), random "
          f"weights, {'float32' if args.cpu else 'float32 master weights + bf16 autocast'}; {device}; {versions()}")
    print(f"DPO: {s['dpo_pairs']} pairs a step, {PROMPT_TOKENS} + {s['dpo_tokens']} tokens, {s['dpo_steps']} steps; "
          f"GRPO: {s['grpo_prompts']} prompts x {s['grpo_generations']} completions of {s['grpo_tokens']} tokens, "
          f"{s['grpo_steps']} steps (HF generate); memory = {memory}; MFU against {peak or 'n/a'} TFLOP/s")
    lines = report(results, n_params, peak, which)
    checked, consistent = consistency(results, which)
    print("\n".join(lines + checked))
    if not args.cpu:  # vLLM weight pushes, HTTP vs NCCL and adapter vs merged, when vLLM is here (it is not today)
        from bench_sync import gpu_check_lines
        print("\n".join(gpu_check_lines(deadline - time.monotonic())))
    print(f"gpu_check: done in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"shape": shape, "params": n_params, "settings": s, "device": device, "versions": versions(),
                       "results": [{"tool": t, "launch": la, "method": m, **r}
                                   for (t, la), per in results.items() for m, r in per.items()]}, fh, indent=1)
    failed = any("failed" in r for per in results.values() for r in per.values())
    return 1 if failed or not consistent else 0


if __name__ == "__main__":
    sys.exit(main())
