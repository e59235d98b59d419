"""Chunked log-probs under two processes (issue 18 §2): each of two gloo processes (`accelerate launch`) scores its
rows of a batch through the DDP-wrapped model, ``logits_block_size`` tokens at a time (and padding-free), and
backpropagates; the gathered log-probs and entropies, and the all-reduced gradient of every parameter, equal one
process's unchunked pass over the whole batch in fp32 (1e-6 of their scale; 2e-6 for gradients, see
``tests/unit/test_chunked_logps.py::assert_near``; 1e-5 padding-free, see ``tests/unit/test_padding_free.py``), for
the full model and with LoRA.

Run as a script under the launcher, this file is the worker: it prints one ``RESULT {json}`` line per case from the
main process, the largest relative difference of each quantity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# (model, logits_block_size, padding_free): block 1 and 7 split rows; 64 holds a process's whole share
CASES = [("full", 1, False), ("full", 7, False), ("full", 64, False), ("full", 7, True), ("lora", 7, False),
         ("lora", 5, True)]
LIMITS = {"logps": 1e-6, "entropy": 1e-6, "grads": 2e-6}
PACKED_LIMIT = 1e-5


def rel_error(got, want) -> float:
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def build(kind: str):
    sys.path.insert(0, os.path.join(REPO, "tests", "unit"))
    from test_chunked_logps import tiny_llama

    model = tiny_llama()  # the same seed in every process: the same weights
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def worker() -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from test_chunked_logps import COMPLETIONS, PROMPTS

    from align.logps import pack, token_logps

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # as the recipes' CPU processes (TrainingArguments with use_cpu)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2
    prompts, completions = PROMPTS + PROMPTS[:1], COMPLETIONS + [COMPLETIONS[2][:7]]  # 4 rows: 2 a process
    ids, attn, cmask, width = pack(prompts, completions, pad_id=0)
    weights = torch.linspace(0.5, 1.5, cmask.numel()).view(cmask.shape) * cmask
    for kind, block, padding_free in CASES:
        model = build(kind).train()
        # one process's unchunked pass over the whole batch: the reference
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, block_size=0)
        (logps * weights).sum().backward()
        want = {"logps": logps.detach() * cmask, "entropy": entropy * cmask,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}
        model.zero_grad(set_to_none=True)
        ddp = acc.prepare(model)
        rows = slice(rank * 2, rank * 2 + 2)
        logps, entropy = token_logps(ddp, ids[rows], attn[rows], width, with_entropy=True, block_size=block,
                                     padding_free=padding_free)
        acc.backward((logps * weights[rows]).sum() * world)  # DDP averages: x world gives the whole batch's sum
        got_logps = acc.gather(logps.detach() * cmask[rows])
        got_entropy = acc.gather(entropy * cmask[rows])
        inner = acc.unwrap_model(ddp)
        got_grads = {n: p.grad for n, p in inner.named_parameters() if p.requires_grad}
        assert got_grads.keys() == want["grads"].keys()
        assert all(g.abs().max() > 0 for g in got_grads.values())
        result = {"case": [kind, block, padding_free], "logps": rel_error(got_logps, want["logps"]),
                  "entropy": rel_error(got_entropy, want["entropy"]),
                  "grads": max(rel_error(got_grads[n], want["grads"][n]) for n in got_grads),
                  "params": len(got_grads)}
        if acc.is_main_process:
            print("RESULT " + json.dumps(result), flush=True)
        acc.free_memory()
    acc.end_training()


def test_two_processes_chunked_equal_one_unchunked():
    from ports import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), os.path.abspath(__file__)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(REPO, "tests", "unit")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [tuple(r["case"]) for r in results] == CASES
    for r in results:
        print(r)
        assert r["params"] == (21 if r["case"][0] == "full" else 12), r  # every weight / every LoRA matrix
        for key, limit in LIMITS.items():
            assert r[key] <= (PACKED_LIMIT if r["case"][2] else limit), (key, r)


if __name__ == "__main__":
    worker()
