"""Two nodes (issue 15 §3): ``configs/accelerate/multi_node.yaml`` launched as documented, once per "machine"
(``--machine_rank 0`` and ``--machine_rank 1``, ``--main_process_ip 127.0.0.1``), each machine one CPU process, both
launchers started as subprocesses on this host: machine 0 with ``accelerate launch``, machine 1 with ``align train
--accelerate_config ... --machine_rank 1 --main_process_ip ...``. DPO on the testbed then logs, step by step, the
losses of one process with the same global batch (16 pairs), and the run's model card says it had 2 processes on 2
machines.

On the CPU accelerate 1.15 runs no FSDP, so align shards the policy itself with FSDP2 (align/fsdp2.py); the
rendezvous, the node ranks and the cross-machine all-gathers and reduce-scatters are the real multi-node path, and the
losses must be one process's."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from ports import free_port

from align.sharding import FSDP2_NOTE, cpu_fallback_warning

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
DPO = ["--config", "configs/dpo/testbed.yaml", "max_steps=3", "logging_steps=1", "save_strategy=no",
       "max_train_samples=64", "dataset_test_split=null", "disable_tqdm=true", "overwrite_output_dir=true"]
TIMEOUT_S = 900  # both machines together; a hung rendezvous is killed, never waited on for ever


def two_machine_config(repo, tmp_path) -> str:
    """multi_node.yaml as the docs say to adapt it to this CPU host: use_cpu, one process per machine, fp32."""
    cfg = yaml.safe_load((repo / "configs" / "accelerate" / "multi_node.yaml").read_text())
    assert cfg["num_machines"] == 2 and cfg["distributed_type"] == "FSDP"  # the shipped file, not a stand-in
    cfg.update(use_cpu=True, num_processes=2, mixed_precision="no")
    path = tmp_path / "multi_node-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start(cmd, repo, log):
    return subprocess.Popen(cmd, cwd=repo, stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"),
                            text=True, env=ENV, start_new_session=True)


def wait_all(procs, timeout_s: float) -> list[int]:
    """Every process's exit status; the process groups still running after ``timeout_s`` are killed (a machine
    whose peer died would wait at the rendezvous otherwise) and the test fails naming the timeout."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        pytest.fail(f"the two machines did not finish within {timeout_s} s")


def steps_of(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_machines_of_one_process_give_one_process_losses(repo, testbed, tmp_path):
    one = subprocess.run([sys.executable, "-m", "align.recipes.dpo", *DPO, "per_device_train_batch_size=16",
                          f"output_dir={tmp_path / 'one'}"], cwd=repo, env=ENV, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]

    config, port, out = two_machine_config(repo, tmp_path), str(free_port()), tmp_path / "two"
    # machine 0 as the config's comment says (accelerate launch), machine 1 through align train's launcher flags
    machine0 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--machine_rank", "0",
                "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "align.recipes.dpo"]
    machine1 = [sys.executable, "-m", "align.cli", "train", "dpo", "--accelerate_config", config, "--machine_rank", "1",
                "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    procs = [start([*cmd, *DPO, "per_device_train_batch_size=8", f"output_dir={out}"], repo, tmp_path / f"machine{r}")
             for r, cmd in enumerate((machine0, machine1))]
    codes = wait_all(procs, TIMEOUT_S)
    err = [(tmp_path / f"machine{r}.err").read_text() for r in (0, 1)]
    stdout0 = (tmp_path / "machine0.out").read_text()
    assert codes == [0, 0], err[0][-2000:] + err[1][-2000:]

    # a world of 2 over 2 machines: the card of the run (written by global rank 0, on machine 0) and the batch line
    assert "- Processes: 2 on 2 machines (CPU)" in (out / "README.md").read_text()
    assert "x processes 2 = 16 sequences per optimizer step" in stdout0
    # accelerate 1.15 runs no FSDP on the CPU: align shards DPO's policy itself (align/fsdp2.py), said once by the
    # main process; each machine's process holds half of the embedding's rows, the gathers cross the machines
    assert err[0].count(FSDP2_NOTE) == 1 and FSDP2_NOTE not in err[1]
    assert cpu_fallback_warning("FSDP") not in err[0] + err[1]
    assert ("FSDP2 (process 0 of 2): fully_shard on 5 modules, DTensor parameters; model.embed_tokens.weight: "
            "192 x 256 here of 384 x 256") in stdout0
    assert "FSDP2 (process 1 of 2)" in (tmp_path / "machine1.out").read_text()

    mine, single = steps_of(out), steps_of(tmp_path / "one")
    assert [s["step"] for s in mine] == [s["step"] for s in single] == [1, 2, 3]
    assert mine[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert [s[key] for s in mine] == pytest.approx([s[key] for s in single], abs=1e-5), key
    assert mine[2]["loss"] != pytest.approx(mine[0]["loss"], abs=1e-3)  # the run moved
