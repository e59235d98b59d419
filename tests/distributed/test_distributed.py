"""Two CPU processes (gloo, `accelerate launch`) against one process with the same global batch:
the same losses at every step, the same reference log-probs, and the same final weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

COMMON = ["--config", "configs/dpo/testbed.yaml", "max_steps=4", "logging_steps=1", "save_strategy=no",
          "max_train_samples=128", "max_eval_samples=16", "disable_tqdm=true", "overwrite_output_dir=true"]


def run_dpo(repo, out, processes: int, per_device: int, extra=()):
    launcher = [sys.executable, "recipes/dpo.py"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    "configs/accelerate/cpu2.yaml", "--num_processes", str(processes), "--main_process_port",
                    str(free_port()), "recipes/dpo.py"]
    cmd = [*launcher, *COMMON, f"output_dir={out}", f"per_device_train_batch_size={per_device}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    # the train table (128 rows) is the larger of the two caches (the file names are content hashes)
    refs = sorted((p for p in out.iterdir() if p.name.startswith("ref_logps-")), key=lambda p: -p.stat().st_size)
    weights = out / ("adapter_model.safetensors" if "use_peft=true" in extra else "model.safetensors")
    return proc, losses, load_file(str(weights)), torch.load(refs[0], weights_only=True)


MONITOR = ("entanglement_steps=2", "entanglement_probe_size=8", "entanglement_params=[lm_head,last_block]",
           "entanglement_action=downweight")


# LoRA dropout off: dropout masks are drawn per process, so no layout of processes can reproduce them.
# No plain full-model case: "entanglement" is the full model (every weight trained, the same loss, reference-table
# and final-weight assertions) with the monitor on top, and plain DPO's step losses, margins and grad norms on two
# processes against one are test_even_batches.py's (dataloader_drop_last); each case here is two launches (~45 s).
@pytest.mark.parametrize("extra", [("use_peft=true", "lora_r=4", "lora_dropout=0", "learning_rate=2e-3"), MONITOR],
                         ids=["lora", "entanglement"])
def test_two_processes_match_one(repo, tmp_path, testbed, extra):
    one, losses1, w1, ref1 = run_dpo(repo, tmp_path / "one", 1, 16, extra)
    two, losses2, w2, ref2 = run_dpo(repo, tmp_path / "two", 2, 8, extra)
    assert "x processes 2 = 16 sequences" in two.stdout and "x processes 1 = 16 sequences" in one.stdout
    assert len(losses1) == len(losses2) == 4
    assert losses2 == pytest.approx(losses1, abs=1e-5)
    assert losses1[-1] != pytest.approx(losses1[0], abs=1e-4)  # the run did move
    assert torch.allclose(ref1, ref2, atol=1e-5)  # the sharded precomputation gathers to the same table
    # Final weights: the two runs differ by float rounding only (Adam amplifies last-bit differences in
    # near-zero gradients, so compare the gap with the size of the update the run made).
    if extra == MONITOR:  # the probe pairs, split over the processes, gather to the same table
        t1, t2 = ([json.loads(x) for x in (tmp_path / n / "entanglement.jsonl").read_text().splitlines()]
                  for n in ("one", "two"))
        assert len(t1) == len(t2) == 3 * 8
        for a, b in zip(t1, t2, strict=True):
            assert (a["step"], a["pair"], a["case"]) == (b["step"], b["pair"], b["case"])
            assert a["dot"] == pytest.approx(b["dot"], rel=1e-3, abs=1e-5)
            assert a["norm_chosen"] == pytest.approx(b["norm_chosen"], rel=1e-3)
    if "use_peft=true" in extra:  # LoRA: compare the B matrices, which start at zero
        w1, w2 = ({k: v for k, v in w.items() if "lora_B" in k} for w in (w1, w2))
        w0 = {k: torch.zeros_like(v) for k, v in w1.items()}
    else:
        w0 = load_file(str(testbed.policy / "model.safetensors"))
    assert w1.keys() == w2.keys()
    gap = sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1) ** 0.5
    update = sum(((w1[k] - w0[k]) ** 2).sum().item() for k in w1) ** 0.5
    print(f"max |w1 - w2| = {max((w1[k] - w2[k]).abs().max().item() for k in w1):.2e}, "
          f"||w1 - w2|| / ||update|| = {gap / update:.2e}")
    assert update > 1e-3
    assert gap / update < 1e-3
