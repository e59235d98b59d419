"""The shipped accelerate configs, adapted to two CPU processes (use_cpu, gloo, one machine), never exit 0 on wrong
numbers (issue 15): each run trains with the 1-process numbers, or is refused with one line before any model loads.

On the CPU accelerate 1.15 runs an FSDP or ZeRO-1/2 config as plain DDP (a warning says so, once), except that DPO,
GRPO, RAFT, online DPO, XPO, EGPO and the iterative driver's DPO rounds run FSDP configs with align's own
``fully_shard`` (align/fsdp2.py, test_fsdp2.py); FSDP's ``fsdp_cpu_ram_efficient_loading`` still makes transformers
load zeros on every process but local rank 0, which align now replaces by rank 0's weights before its first pass (the
reference log-probs, the frozen reference copy, the samples). A DeepSpeed config runs DeepSpeed's engine on the CPU
(ZeRO-2 here, ZeRO-3 in test_fsdp2.py); with use_cpu: true set by hand ZeRO-3 is refused. ``align train
--accelerate_config`` gives the 1-process numbers. ZeRO-3's gathered reference pass is checked with weights
partitioned by DeepSpeed's ``zero.Init`` on two gloo processes (zero3_gather_check.py)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from launch_configs import cpu_variant
from ports import free_port

from align.sharding import FSDP2_NOTE, cpu_fallback_warning

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
DPO = ["--config", "configs/dpo/testbed.yaml", "max_steps=2", "logging_steps=1", "save_strategy=no",
       "max_train_samples=64", "dataset_test_split=null", "disable_tqdm=true", "overwrite_output_dir=true"]
ONLINE = ["max_steps=1", "logging_steps=1", "save_strategy=no", "max_train_samples=32", "dataset_test_split=null",
          "disable_tqdm=true", "overwrite_output_dir=true"]


def run_group(cmd, repo, timeout=900):
    """``cmd`` in its own process group, all of which is killed if it outlives ``timeout`` (a launcher's workers
    would outlive the launcher otherwise)."""
    with subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(repo, out, recipe: str, args, launch_config: str | None = None, via_align: bool = False):
    """The recipe run directly (1 process), under ``accelerate launch --config_file launch_config``, or as ``align
    train <recipe> --accelerate_config ...``; returns the process and the logged step records."""
    port = str(free_port())
    if launch_config is None:
        cmd = [sys.executable, "-m", f"align.recipes.{recipe}"]
    elif via_align:
        cmd = [sys.executable, "-m", "align.cli", "train", recipe, "--accelerate_config", launch_config,
               "--num_processes", "2", "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_config, "--num_processes",
               "2", "--main_process_port", port, "-m", f"align.recipes.{recipe}"]
    proc = run_group([*cmd, *args, f"output_dir={out}"], repo)
    metrics = out / "metrics.jsonl"
    steps = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    return proc, [r for r in steps if "loss" in r]


@pytest.fixture(scope="module")
def dpo_one(repo, testbed, tmp_path_factory):
    proc, steps = run(repo, tmp_path_factory.mktemp("dpo-one"), "dpo", [*DPO, "per_device_train_batch_size=16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return steps


def warned_once(proc, kind: str = "FSDP") -> bool:
    return proc.stderr.count(cpu_fallback_warning(kind)) == 1


def own_fsdp2(proc) -> bool:
    """DPO, GRPO, RAFT, online DPO, XPO, EGPO under an FSDP config on the CPU: align's own fully_shard (test_fsdp2.py),
    said once, no DDP fallback warning."""
    return proc.stderr.count(FSDP2_NOTE) == 1 and cpu_fallback_warning("FSDP") not in proc.stderr


@pytest.mark.xdist_group("sharded-dpo")  # one worker runs the shared 1-process run
def test_dpo_under_zero2_on_one_cpu_machine(repo, tmp_path, testbed, dpo_one):
    """ZeRO-1/2 on the CPU: DeepSpeed's engine really runs (align gives the DeepSpeed launch use_cpu false and
    ddp_backend gloo; each process holds half the optimizer state, said once per process), with the 1-process
    numbers. Before, accelerate ran it as DDP. (fsdp2.yaml and zero3.yaml: test_fsdp2.py, multi_node.yaml:
    test_multi_node.py.)"""
    proc, steps = run(repo, tmp_path / "out", "dpo", [*DPO, "per_device_train_batch_size=8"],
                      cpu_variant(repo, tmp_path, "zero2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not warned_once(proc, "ZeRO-2")
    for r in (0, 1):
        assert (f"DeepSpeed ZeRO-2 (process {r} of 2): DeepSpeedEngine, optimizer DeepSpeedZeroOptimizer; optimizer "
                "state: 1279104 of 2558208 elements here") in proc.stdout
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in dpo_one], abs=1e-5)


@pytest.mark.xdist_group("sharded-dpo")  # one worker runs the shared 1-process run
def test_align_train_accelerate_config_gives_one_process_numbers(repo, tmp_path, testbed, dpo_one):
    """``align train --accelerate_config fsdp2-cpu.yaml``: align's fully_shard (the direct ``accelerate launch`` of the
    same config is test_fsdp2.py's), the 1-process numbers. Step 1 compares the policy with its own reference: ln 2;
    before the rank-0 weights fix it was 0.5630 (rank 1's reference log-probs came from all-zero weights)."""
    proc, steps = run(repo, tmp_path / "out", "dpo", [*DPO, "per_device_train_batch_size=8"],
                      cpu_variant(repo, tmp_path, "fsdp2"), via_align=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert own_fsdp2(proc)
    assert "x processes 2 = 16 sequences per optimizer step" in proc.stdout
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert len(steps) == len(dpo_one) == 2
    for mine, theirs in zip(steps, dpo_one, strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), key
    assert steps[1]["loss"] != pytest.approx(steps[0]["loss"], abs=1e-4)  # the run did move


@pytest.mark.parametrize("recipe, key", [("xpo", "xpo/ref_sample_logps")])  # online DPO: test_fsdp2.py
def test_online_trainers_under_fsdp2_on_the_cpu(repo, tmp_path, testbed, recipe, key):
    """The frozen reference is a copy of the policy made before prepare: before the fix rank 1's was all zeros
    (online DPO's first rewards/chosen 1.60, XPO's reference samples random tokens, log-probs -104 for -3.2)."""
    args = ["--config", f"configs/{recipe}/testbed.yaml", *ONLINE]
    proc1, one = run(repo, tmp_path / "one", recipe, [*args, "per_device_train_batch_size=8"])
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    proc2, two = run(repo, tmp_path / "two", recipe, [*args, "per_device_train_batch_size=4"],
                     cpu_variant(repo, tmp_path, "fsdp2"))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert own_fsdp2(proc2)  # align's fully_shard, the frozen reference sharded too
    assert two[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    for k in ("loss", key, "logps/chosen", "logps/rejected"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-4, abs=1e-5), k
    if recipe == "xpo":
        assert two[0][key] > -20  # log-probs of the reference's own short samples, not of random tokens


ITERATIVE = ["--config", "configs/iterative/testbed-ilr-dpo.yaml", "iterations=2", "max_train_samples=48",
             "samples_per_prompt=2", "max_steps=2", "logging_steps=1", "eval_num_samples=0", "dataset_test_split=null",
             "overwrite_output_dir=true", "disable_tqdm=true", "dataloader_drop_last=true"]


LORA = ["use_peft=true", "lora_r=4", "lora_dropout=0", "learning_rate=1e-3"]


@pytest.fixture(scope="module")
def iterative_one(repo, testbed, tmp_path_factory):
    """The 1-process runs, full weights and LoRA."""
    runs = {}
    for name, extra in (("full", []), ("lora", LORA)):
        out = tmp_path_factory.mktemp(f"iterative-one-{name}")
        proc, steps = run(repo, out, "iterative_dpo", [*ITERATIVE, *extra, "per_device_train_batch_size=8"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out, steps
    return runs


@pytest.mark.xdist_group("sharded-iterative")  # one worker runs the shared 1-process runs
@pytest.mark.parametrize("config, weights", [("fsdp2", "full"), ("zero3", "full"), ("fsdp2", "lora"),
                                             ("zero3", "lora")])
def test_iterative_driver_under_fsdp2_and_zero3_on_the_cpu(repo, tmp_path, testbed, iterative_one, config, weights):
    """The iterative driver samples with whole models it loads itself on every process (rank 1's pairs must be rank
    0's: before the rank-0 weights fix they were random bytes; under ZeRO-3 they load partitioned and sample on
    gathered weights) and trains each round with a DPO trainer that align shards (FSDP2) or DeepSpeed partitions
    (ZeRO-3): two iterations (under ZeRO-3 the second round's Trainer failed, accelerate refusing a DeepSpeed plugin
    passed to a second Accelerator), the same pairs in each, the 1-process losses at every step, the same saved
    policies. With LoRA each iteration's policy is saved merged: a sharded one weight by weight as every process
    gathers it (before, the main process alone ran PEFT's merge on its shards: a crash under ZeRO-3, a hang under
    FSDP2)."""
    from safetensors.torch import load_file

    one_dir, one = iterative_one[weights]
    extra = LORA if weights == "lora" else []
    proc2, two = run(repo, tmp_path / "two", "iterative_dpo", [*ITERATIVE, *extra, "per_device_train_batch_size=4"],
                     cpu_variant(repo, tmp_path, config))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    prefix = "base_model.model." if weights == "lora" else ""
    if config == "fsdp2":
        assert own_fsdp2(proc2) and "FSDP2 (process 1 of 2): fully_shard on 5 modules" in proc2.stdout
    else:
        assert ("DeepSpeed ZeRO-3 (process 1 of 2): DeepSpeedEngine, optimizer DeepSpeedZeroOptimizer_Stage3; "
                f"{prefix}model.embed_tokens.weight: 49152 of 98304 elements here") in proc2.stdout
    for t in (0, 1):
        pairs1, pairs2 = ((d / f"iter-{t}" / "pairs.jsonl").read_text().splitlines()
                          for d in (one_dir, tmp_path / "two"))
        assert len(pairs1) >= 16  # two whole global batches of 8
        assert [json.loads(p) for p in pairs2] == [json.loads(p) for p in pairs1], t
    assert len(one) == len(two) == 4
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5, abs=1e-5)
    w0 = load_file(str(testbed.policy / "model.safetensors"))
    for t in (0, 1):
        w1, w2 = (load_file(str(d / f"iter-{t}" / "model.safetensors")) for d in (one_dir, tmp_path / "two"))
        assert w1.keys() == w2.keys()
        gap = sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1) ** 0.5
        update = sum(((w1[k] - w0[k]) ** 2).sum().item() for k in w1) ** 0.5
        assert update > 1e-3 and gap / update < 1e-4, (t, gap, update)


def test_zero3_with_use_cpu_true_is_refused_in_one_line(repo, tmp_path, testbed):
    """use_cpu: true by hand makes accelerate run a DeepSpeed launch as DDP, on weights ZeRO-3 already partitioned:
    one line from each process, before any model loads."""
    proc, steps = run(repo, tmp_path / "out", "dpo", [*DPO, "per_device_train_batch_size=8", "use_cpu=true"],
                      cpu_variant(repo, tmp_path, "zero3"))
    line = ("error: use_cpu: true makes accelerate 1.15 run a DeepSpeed launch as plain DDP, after transformers had "
            "already partitioned the weights for ZeRO-3; leave use_cpu unset (a DeepSpeed launch without a GPU then "
            "runs DeepSpeed on the CPU), or launch with configs/accelerate/zero2.yaml or cpu2.yaml")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode != 0 and steps == []
    assert errors == [line, line]  # the same one line from each of the two processes
    assert "exitcode  : 2" in proc.stderr  # each process's status, as the launcher reports it
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr.split(line)[0]


def test_zero3_reference_pass_gathers_the_partitioned_weights(repo, testbed, tmp_path):
    """ZeRO-3 partitions the weights at load (zero.Init): a forward outside the engine fails ('weight' must be 2-D)
    unless align.sharding.full_weights gathers each module's weights; with it, the log-probs are the full model's."""
    script = repo / "tests" / "distributed" / "zero3_gather_check.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path)]
    proc = run_group(cmd, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["partitioned_before"] and r["partitioned_after"]  # weights are slices outside the pass
        assert r["ungathered_error"] == "'weight' must be 2-D"  # the crash issue 15 reported
        assert r["max_abs_diff"] < 1e-5  # gathered log-probs = the unpartitioned model's
        assert r["logps"] == pytest.approx(results[0]["logps"], abs=1e-6)
