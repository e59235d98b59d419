"""Benchmark: the time to push a policy's weights to vLLM, per channel and per what is pushed.

    python scripts/bench_sync.py [--models testbed 100m] [--reps 5] [--bucket-mb 128] [--lora-r 16]

For the testbed policy (2.6M parameters) and a config-built Llama of ~100M parameters (random weights, the testbed
tokenizer; 14 layers, hidden 768, vocabulary 8192: 100.6M), float32:

1. Server engine (``align serve`` on this machine, ``--max-lora-rank 16``; this process is the trainer): a full
   push over HTTP (``vllm_sync: http``, one safetensors body) and over the collective (``vllm_sync: collective``,
   a gloo group here, NCCL on GPUs; ``--bucket-mb`` buckets); a LoRA policy (rank ``--lora-r`` on every linear
   layer) pushed as its adapter alone vs merged (over HTTP and over the collective).
2. Colocated engine (``rollout: vllm``, a child process): a full push (in place, no copy through a socket), and the
   LoRA policy as its adapter vs merged.

Each figure is the median of ``--reps`` pushes after one untimed push (the fastest in brackets); a push ends when
the engine has loaded the weights (the server's answer). Ratios: collective / HTTP, adapter / merged.

On GPUs (the GPU check, scripts/gpu_check.py, runs it when vLLM is there) the trainer's policy is on GPU 0 and the
server on GPU 1 (NCCL needs a device per member), so it needs 2 GPUs; the colocated engine shares GPU 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def model_path(name: str) -> str:
    from align.testbed.build import ensure_testbed

    policy = str(ensure_testbed(progress=False).policy)
    if name == "testbed":
        return policy
    out = "/tmp/align-bench-llama-101m"
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def lora_of(model, r: int):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                           init_lora_weights=False))


def timed(push, reps: int) -> dict:
    push()  # untimed: first-call costs (allocations, LoRA kernels)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        push()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def device():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def gpu_check_lines(budget_s: float) -> list[str]:
    """The GPU check's weight-sync part: this benchmark on the ~100M model when vLLM and 2 GPUs are here."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or torch.cuda.device_count() < 2:
        return ["weight sync (scripts/bench_sync.py): not measured: it needs vLLM and 2 GPUs here (NCCL needs a GPU "
                "for the trainer and one for the server)"]
    try:
        proc = subprocess.run([sys.executable, __file__, "--models", "100m", "--reps", "3"], capture_output=True,
                              text=True, timeout=max(1.0, budget_s))
    except subprocess.TimeoutExpired:
        return [f"weight sync (scripts/bench_sync.py): not done within the check's budget ({budget_s:.0f} s left)"]
    if proc.returncode:
        return [f"weight sync (scripts/bench_sync.py): failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"]
    return ["weight sync (scripts/bench_sync.py --models 100m --reps 3):",
            *[x for x in proc.stdout.splitlines() if x.startswith(("|", "colocated "))]]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_part(name: str, path: str, args) -> dict:
    import torch

    from align.modeling import load_model, load_tokenizer
    from align.rollout.remote import ServerEngine

    port = free_port()
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": REPO}
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve", "--model", path, "--port", str(port),
                             "--max-model-len", "128", "--gpu-memory-utilization", "0.1", "--dtype", "float32",
                             "--max-lora-rank", str(args.lora_r)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"align serve for {name} did not come up")
                time.sleep(1)
        tok, model = load_tokenizer(path), load_model(path).to(device())
        lora = lora_of(model, args.lora_r)
        out = {}

        def engine(policy, **kw):
            eng = ServerEngine.for_policy(policy, tok, "127.0.0.1", port, timeout_s=300, push_weights=True,
                                          group_port=free_port(), bucket_mb=args.bucket_mb, **kw)
            eng.check(64, policy)
            return eng

        for label, policy, kw in [("full/http", model, {"sync": "http"}),
                                  ("full/collective", model, {"sync": "collective"}),
                                  ("lora-merged/http", lora, {"sync": "http", "lora_adapter": False}),
                                  ("lora-merged/collective", lora, {"sync": "collective", "lora_adapter": False}),
                                  ("lora-adapter", lora, {"sync": "http"})]:
            eng = engine(policy, **kw)
            try:
                out[label] = timed(lambda e=eng, p=policy: e.sync_weights(p), args.reps)
            finally:
                eng.close()
            print(f"  server {name} {label}: {out[label]['median_s']:.3f} s", flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def follow_gap(engine, policy, tok) -> float:
    """The largest |engine log-prob - ``policy``'s| over 4 sampled completions of 2 prompts: ~1e-6 when the engine
    serves the pushed weights, ~0.1 or more when it serves others."""
    import torch

    from align.logps import pack, token_logps
    from align.rollout import SamplingParams

    prompts = [tok("What is 3+4?")["input_ids"], tok("What is 7*8?")["input_ids"]]
    got = engine.generate(prompts, [2, 2], SamplingParams(max_new_tokens=12, seed=1))
    ids, attn, _, width = pack(got.prompt_ids, got.completion_ids, 0)
    with torch.no_grad():
        lp = token_logps(policy, ids.to(device()), attn.to(device()), width)
    return max(abs(a - b) for r, row in enumerate(got.sampling_logps) for a, b in zip(row, lp[r, :len(row)].tolist(),
                                                                                          strict=True))


def colocated_child(path: str, args) -> dict:
    os.environ.update(CPU_ENV)
    from align.modeling import load_model, load_tokenizer
    from align.rollout.vllm_engine import VLLMEngine

    tok, model = load_tokenizer(path), load_model(path).to(device())
    lora = lora_of(model, args.lora_r)
    sleep = device() != "cpu"  # on CUDA the engine sleeps between generations and wakes for each push
    engine = VLLMEngine(model, tok, max_model_len=128, gpu_memory_utilization=0.1, lora_rank=args.lora_r,
                        enable_sleep_mode=sleep)
    # merged before adapter, as a run does one or the other (a full reload after an adapter was loaded is slower)
    out = {"full": timed(lambda: engine.sync_weights(model), args.reps)}
    gaps = {"full": follow_gap(engine, model, tok)}
    engine.push_adapter = False
    out["lora-merged"] = timed(lambda: engine.sync_weights(lora), args.reps)
    gaps["lora-merged"] = follow_gap(engine, lora, tok)
    engine.push_adapter = True
    out["lora-adapter"] = timed(lambda: engine.sync_weights(lora), args.reps)
    gaps["lora-adapter"] = follow_gap(engine, lora, tok)
    engine.close()
    out["gaps"], out["sleep_mode"] = gaps, sleep
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["testbed", "100m"], choices=["testbed", "100m"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=128.0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(colocated_child(args.child, args)), flush=True)
        return
    import torch

    rows = []
    for name in args.models:
        path = model_path(name)
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
                         .parameters())
        server = server_part(name, path, args)
        proc = subprocess.run([sys.executable, __file__, "--child", path, "--reps", str(args.reps), "--lora-r",
                               str(args.lora_r)], capture_output=True, text=True, env={**os.environ, **CPU_ENV})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"colocated {name} failed:\n{proc.stderr[-3000:]}")
        colocated = json.loads(line[0][7:])
        rows.append((name, params, server, colocated))

    def f(r):
        return f"{r['median_s']:.3f} ({r['min_s']:.3f})"

    print(f"\n| model | params | engine | full HTTP s | full collective s | collective / HTTP | LoRA r={args.lora_r} "
          "merged s | adapter s | adapter / merged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, params, s, c in rows:
        ratio = s["full/collective"]["median_s"] / s["full/http"]["median_s"]
        lr = s["lora-adapter"]["median_s"] / s["lora-merged/http"]["median_s"]
        print(f"| {name} | {params / 1e6:.1f}M | server | {f(s['full/http'])} | {f(s['full/collective'])} | "
              f"{ratio:.2f}x | {f(s['lora-merged/http'])} (HTTP), {f(s['lora-merged/collective'])} (collective) | "
              f"{f(s['lora-adapter'])} | {lr:.3f}x (of merged over HTTP) |")
        lc = c["lora-adapter"]["median_s"] / c["lora-merged"]["median_s"]
        print(f"| {name} | {params / 1e6:.1f}M | colocated | {f(c['full'])} (in place) | - | - | {f(c['lora-merged'])} "
              f"| {f(c['lora-adapter'])} | {lc:.3f}x |")
    for name, _, _, c in rows:  # the colocated engine serves what was pushed (on CUDA: through sleep and wake)
        gaps = ", ".join(f"{k} {v:.1e}" for k, v in c["gaps"].items())
        print(f"colocated {name}{' with sleep mode' if c['sleep_mode'] else ''}: max |logp gap| after the last push: "
              f"{gaps} ({'ok' if max(c['gaps'].values()) < 1e-3 else 'WRONG: the engine does not serve the push'})")
    if any(max(c["gaps"].values()) >= 1e-3 for *_, c in rows):
        sys.exit("bench_sync: a colocated engine does not serve the pushed weights")


if __name__ == "__main__":
    main()
