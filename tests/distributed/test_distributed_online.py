"""EGPO on two CPU processes (gloo, `accelerate launch`) against one process with the same global batch and
seed: the same losses, preference targets and oracle calls at every step, and the same final weights. Four
Trainer steps are two extragradient iterations, so the parameter and optimizer-state restore runs under DDP."""

import json
import os
import subprocess
import sys

import pytest
from ports import free_port
from safetensors.torch import load_file

COMMON = ["--config", "configs/egpo/testbed.yaml", "max_steps=4", "logging_steps=1", "save_strategy=no",
          "max_train_samples=64", "dataset_test_split=null", "disable_tqdm=true", "overwrite_output_dir=true",
          "learning_rate=5e-4", "egpo_variant=oipo1"]
KEYS = ("loss", "online_ipo/target", "online_ipo/mean_gap", "logps/chosen", "logps/rejected", "oracle/calls",
        "completions/mean_length")


def run_egpo(repo, out, processes: int, per_device: int):
    launcher = [sys.executable, "recipes/egpo.py"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    "configs/accelerate/cpu2.yaml", "--num_processes", str(processes), "--main_process_port",
                    str(free_port()), "recipes/egpo.py"]
    cmd = [*launcher, *COMMON, f"output_dir={out}", f"per_device_train_batch_size={per_device}"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], load_file(str(out / "model.safetensors"))


def test_egpo_two_processes_match_one(repo, tmp_path, testbed):
    logs1, w1 = run_egpo(repo, tmp_path / "one", 1, 8)
    logs2, w2 = run_egpo(repo, tmp_path / "two", 2, 4)
    assert len(logs1) == len(logs2) == 4
    for key in KEYS:
        assert [r[key] for r in logs2] == pytest.approx([r[key] for r in logs1], rel=1e-4, abs=1e-6), key
    assert [r["oracle/calls"] for r in logs1] == [16, 32, 48, 64]  # 8 prompts x 2 judgements (oipo1) a step
    w0 = load_file(str(testbed.policy / "model.safetensors"))
    gap = sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1) ** 0.5
    update = sum(((w1[k] - w0[k]) ** 2).sum().item() for k in w1) ** 0.5
    print(f"EGPO 2 vs 1 process: gap/update = {gap / update:.2e}")
    assert update > 1e-3
    assert gap / update < 5e-3
