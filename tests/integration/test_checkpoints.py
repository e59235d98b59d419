"""Nothing the user made is lost, no silently wrong resume (issue 20 §1): checkpoints are whole or absent, resume
takes the newest complete one and says so, overwrite_output_dir leaves nothing of the old run to resume, an RL
checkpoint without its state is refused, metrics.jsonl never repeats steps, the reference cache follows the
weights, and a testbed build never deletes a folder it did not make."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

from align.checkpoints import missing_parts
from align.config import load_config
from align.errors import ConfigError
from align.metrics import read_jsonl, truncate_after
from align.recipe import start
from align.recipes.dpo import DPORecipeConfig

DPO_SMALL = {"max_train_samples": 64, "dataset_test_split": None, "logging_steps": 1, "disable_tqdm": True,
             "save_strategy": "steps", "save_steps": 2}


def dpo_cfg(repo, out, **kw):
    return load_config(DPORecipeConfig, repo / "configs/dpo/testbed.yaml",
                       {"output_dir": str(out), **DPO_SMALL, **kw})


def fake_checkpoint(folder, *names):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text("{}")
    return folder


# --- which checkpoint a resume takes ---------------------------------------------------------------------------


def test_resume_takes_the_newest_complete_checkpoint_and_says_which(repo, tmp_path, testbed, capsys):
    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", "trainer_state.json", "model.safetensors")
    fake_checkpoint(out / "checkpoint-4", "model.safetensors", "optimizer.pt")  # killed before trainer_state.json
    fake_checkpoint(out / "checkpoint-6", "trainer_state.json")  # no weights
    fake_checkpoint(out / ".checkpoint-8.tmp" / "checkpoint-8", "trainer_state.json", "model.safetensors")  # staging
    capsys.readouterr()
    config = dpo_cfg(repo, out, resume_from_checkpoint="true")
    assert config.resume_from_checkpoint == str(out / "checkpoint-2")
    assert capsys.readouterr().out == (f"resuming from {out}/checkpoint-2, skipping incomplete checkpoint-6 "
                                       f"(no model weights); checkpoint-4 (no trainer_state.json)\n")

    with pytest.raises(ConfigError) as err:  # an explicit incomplete folder is refused, naming what it lacks
        dpo_cfg(repo, out, resume_from_checkpoint=str(out / "checkpoint-4"))
    assert str(err.value) == (f"resume_from_checkpoint: '{out}/checkpoint-4' is not a complete checkpoint, it has "
                              "no trainer_state.json")

    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(ConfigError) as err:
        dpo_cfg(repo, out, resume_from_checkpoint="true")
    assert str(err.value) == (f"resume_from_checkpoint: no complete checkpoint-* folder in output_dir '{out}' "
                              "(incomplete: checkpoint-6 (no model weights); checkpoint-4 (no trainer_state.json))")


def test_completeness_counts_the_trainer_state_file(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-3", "trainer_state.json", "adapter_model.safetensors")
    assert missing_parts(str(folder)) == []
    assert missing_parts(str(folder), "rl_state.json") == ["rl_state.json"]
    assert missing_parts(str(tmp_path / "none"), "rl_state.json") == ["trainer_state.json", "model weights",
                                                                      "rl_state.json"]


def test_overwrite_output_dir_leaves_nothing_of_the_old_run_to_resume(repo, tmp_path, testbed, capsys, monkeypatch):
    out = tmp_path / "out"
    for step in (10, 31):
        fake_checkpoint(out / f"checkpoint-{step}", "trainer_state.json", "model.safetensors")
    fake_checkpoint(out / ".checkpoint-40.tmp" / "checkpoint-40", "model.safetensors")
    fake_checkpoint(out / "checkpoint-7", "notes.txt")  # named like one, holds no trainer_state.json: not ours
    (out / "metrics.jsonl").write_text('{"step": 31, "loss": 0.1}\n')
    (out / "notes.txt").write_text("mine")

    config = dpo_cfg(repo, out, overwrite_output_dir=True)
    assert (out / "checkpoint-31").is_dir()  # validation removes nothing: a refused config costs no checkpoint
    monkeypatch.setenv("RANK", "1")  # another process of the launch removes nothing
    config.clear_previous_run()
    assert (out / "checkpoint-31").is_dir() and capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")

    start(config)  # every run's start-of-training bookkeeping removes the old run
    assert capsys.readouterr().out.splitlines()[0] == (f"overwrite_output_dir: removed the previous run's "
                                                       f"checkpoint-10, checkpoint-31, metrics.jsonl from '{out}'")
    assert sorted(os.listdir(out)) == ["align_config.yaml", "checkpoint-7", "notes.txt"]
    assert (out / "checkpoint-7" / "notes.txt").read_text() == "{}" and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: no complete checkpoint-\* folder in output_dir "
                                          r".*\(incomplete: checkpoint-7 \(no trainer_state.json and no model "
                                          r"weights\)\)$"):
        dpo_cfg(repo, out, resume_from_checkpoint="true")


# --- metrics.jsonl on resume ------------------------------------------------------------------------------------


def test_truncate_after_cuts_only_the_trailing_records(tmp_path):
    """The iterative driver logs every round into one file (each round counts from 1): a resume of round 2 at its
    step 2 keeps round 1 whole; a line cut short by the kill goes too."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": r * 10 + s} for r, steps in ((1, (1, 2, 3)), (2, (1, 2, 3, 4))) for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    truncate_after(str(path), 2)
    assert [(r["step"], r["loss"]) for r in read_jsonl(str(path))] == [(1, 11), (2, 12), (3, 13), (1, 21), (2, 22)]
    before = path.read_text()
    truncate_after(str(path), 2)  # nothing after step 2 any more: untouched
    assert path.read_text() == before


# --- testbed build --dir ----------------------------------------------------------------------------------------


def test_testbed_build_refuses_a_folder_that_is_not_a_testbed(tmp_path, capsys, monkeypatch):
    from align.cli import main
    from align.testbed.build import ensure_testbed

    mine = tmp_path / "work"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "thesis.tex").write_text("years of work")
    (mine / "testbed.json").write_text("[]")  # a file of that name, not ours
    capsys.readouterr()
    assert main(["testbed", "build", "--dir", str(mine), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: testbed folder '{mine}' (--dir / ALIGN_TESTBED_DIR) is a folder that holds no testbed; "
                   "it is left untouched: name a new or empty folder\n")
    monkeypatch.chdir(mine)
    assert main(["testbed", "build", "--dir", ".", "--force"]) == 2  # `--dir .`: the current folder
    assert f"'{mine}'" in capsys.readouterr().err
    monkeypatch.setenv("ALIGN_TESTBED_DIR", str(mine / "src"))
    with pytest.raises(ConfigError, match=r"src' \(--dir / ALIGN_TESTBED_DIR\) is a folder that holds no testbed"):
        ensure_testbed(force=True)
    assert (mine / "src" / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["work"] and sorted(os.listdir(mine)) == ["src", "testbed.json"]


def test_testbed_rebuild_replaces_only_a_testbed(tmp_path, monkeypatch):
    import align.testbed.build as build

    def fake_build(tmp, progress, spec=build.SPEC_VERSION):
        (tmp / "testbed.json").write_text(json.dumps({"spec_version": build.SPEC_VERSION, "new": True}))

    monkeypatch.setattr(build, "_build_in_child", fake_build)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build.ensure_testbed(empty).info["new"] is True  # an empty folder: built into its place
    old = tmp_path / "old"
    old.mkdir()
    (old / "testbed.json").write_text(json.dumps({"spec_version": 1}))
    (old / "base").mkdir()
    assert build.ensure_testbed(old).info == {"spec_version": 1}  # present, not forced: kept as it is
    assert build.ensure_testbed(old, force=True).info["new"] is True
    assert sorted(os.listdir(old)) == ["testbed.json"]  # the old testbed went whole

    def failing_build(tmp, progress, spec=build.SPEC_VERSION):
        (tmp / "base").mkdir()
        raise RuntimeError("testbed build failed")

    monkeypatch.setattr(build, "_build_in_child", failing_build)
    with pytest.raises(RuntimeError, match="testbed build failed"):
        build.ensure_testbed(old, force=True)
    assert build.ensure_testbed(old).info["new"] is True  # a failed rebuild leaves the testbed in place
    assert sorted(os.listdir(tmp_path)) == ["empty", "empty.lock", "old", "old.lock"]  # no build leftovers


# --- kill -9 during a save; resume ------------------------------------------------------------------------------

# A DPO run whose save of checkpoint-4 stops after the weights and optimizer are written (before the RNG and trainer
# states): it announces that in the file argv[1], then waits to be killed.
KILLED_RUN = """
import sys, time
import transformers
from align.recipe import main
from align.recipes.dpo import RECIPE

save_rng_state = transformers.Trainer._save_rng_state
def paused(self, output_dir):
    if self.state.global_step == 4:
        open(sys.argv[1], "w").close()
        time.sleep(900)
    save_rng_state(self, output_dir)
transformers.Trainer._save_rng_state = paused
sys.exit(main(RECIPE, sys.argv[2:]))
"""


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(str(out / "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(repo, tmp_path, testbed, capsys):
    from align.recipes.dpo import run

    run(dpo_cfg(repo, tmp_path / "straight", max_steps=6))
    straight = losses(tmp_path / "straight")
    assert [s for s, _ in straight] == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "killed"
    marker = tmp_path / "saving"
    args = ["--config", str(repo / "configs/dpo/testbed.yaml"), f"output_dir={out}", "max_steps=6",
            *(f"{k}={'null' if v is None else str(v).lower()}" for k, v in DPO_SMALL.items())]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(marker), *args], cwd=repo, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    # The kill landed mid-save: the half-written checkpoint is in its staging folder, never at checkpoint-4.
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == [".checkpoint-4.tmp", "checkpoint-2"]
    assert missing_parts(str(out / ".checkpoint-4.tmp" / "checkpoint-4")) == ["trainer_state.json"]
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]  # logged before the kill
    # What a save written in place (older align, another tool) leaves: checkpoint-4 without trainer_state.json.
    shutil.copytree(out / ".checkpoint-4.tmp" / "checkpoint-4", out / "checkpoint-4")

    capsys.readouterr()
    run(dpo_cfg(repo, out, max_steps=6, resume_from_checkpoint="true"))
    assert capsys.readouterr().out.splitlines()[0] == (f"resuming from {out}/checkpoint-2, skipping incomplete "
                                                       "checkpoint-4 (no trainer_state.json)")
    resumed = losses(out)
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the killed run are not repeated
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-6)
    assert straight[-1][1] != pytest.approx(straight[0][1], abs=1e-3)  # the run moved
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", out))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(missing_parts(str(out / f"checkpoint-{s}")) == [] for s in (2, 4, 6))


# --- RL resume state --------------------------------------------------------------------------------------------


def test_rl_checkpoint_without_its_state_is_refused_in_one_line(repo, tmp_path, testbed, capfd):
    from align.recipe import main
    from align.recipes.grpo import RECIPE

    out = tmp_path / "out"
    common = ["--config", str(repo / "configs/grpo/testbed.yaml"), f"output_dir={out}", "max_steps=2",
              "per_device_train_batch_size=4", "num_generations=4", "num_minibatches=1", "max_train_samples=64",
              "dataset_test_split=null", "save_strategy=steps", "save_steps=2", "logging_steps=1", "disable_tqdm=true"]
    assert main(RECIPE, common) == 0
    state = json.loads((out / "checkpoint-2" / "rl_state.json").read_text())  # written before the rename
    last = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "loss" in r][-1]
    assert state["rollouts_total"] == last["rollouts/total"] > 0
    (out / "checkpoint-2" / "rl_state.json").unlink()
    for resume in (str(out / "checkpoint-2"), "true"):
        capfd.readouterr()
        assert main(RECIPE, [*common, "max_steps=4", f"resume_from_checkpoint={resume}"]) == 2
        err = capfd.readouterr().err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: resume_from_checkpoint: '{out}/checkpoint-2' is not a complete checkpoint, it has no "
            "rl_state.json; the trainer's resume state (counters, prompt statistics) would restart from zero: "
            "resume from a checkpoint saved with it, or start afresh"]
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl")) if "loss" in r] == [1, 2]  # nothing trained


# --- the reference log-prob cache -------------------------------------------------------------------------------


def test_reference_cache_follows_the_weights_not_the_path(repo, tmp_path, testbed):
    """Replace the weights at the same model path and rerun with overwrite_output_dir: the reference is the new
    model, so DPO's first loss is ln 2 (policy = reference), not the value against the old model's cache."""
    from align.recipes.dpo import run

    model = tmp_path / "model"
    shutil.copytree(testbed.policy, model)
    out = tmp_path / "out"
    over = {"model_name_or_path": str(model), "max_steps": 1, "save_strategy": "no"}
    run(dpo_cfg(repo, out, **over))
    assert losses(out)[0][1] == pytest.approx(math.log(2), abs=1e-4)
    (first,) = [p.name for p in out.iterdir() if p.name.startswith("ref_logps-")]

    shutil.copy(testbed.base / "model.safetensors", model / "model.safetensors")  # other weights, same path
    run(dpo_cfg(repo, out, overwrite_output_dir=True, **over))
    assert losses(out) == [(1, pytest.approx(math.log(2), abs=1e-4))]
    second = [p.name for p in out.iterdir() if p.name.startswith("ref_logps-") and p.name != first]
    assert len(second) == 1
    # The stale cache would not have given ln 2: DPO of the new model against the old reference, over every row.
    old, new = (torch.load(out / n, weights_only=True) for n in (first, second[0]))
    stale = torch.nn.functional.softplus(-0.1 * ((new[:, 0] - new[:, 1]) - (old[:, 0] - old[:, 1]))).mean()
    print("DPO loss against the stale reference:", stale.item())
    assert abs(stale.item() - math.log(2)) > 0.1


# --- the SFT trainer and rotation -------------------------------------------------------------------------------


def test_sft_checkpoints_are_staged_and_rotated(repo, tmp_path, testbed):
    from align.recipes.sft import SFTRecipeConfig
    from align.trainers.sft import train_sft

    out = tmp_path / "sft"
    config = load_config(SFTRecipeConfig, repo / "configs/sft/testbed.yaml", {
        "output_dir": str(out), "model_name_or_path": "testbed:policy", "max_train_samples": 32, "max_steps": 3,
        "per_device_train_batch_size": 8, "warmup_steps": 0, "save_strategy": "steps", "save_steps": 1,
        "save_total_limit": 2, "disable_tqdm": True})
    train_sft(config)
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-3"]
    assert missing_parts(str(out / "checkpoint-3")) == []
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


# --- two processes ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_one_complete_checkpoint_and_resume_it(repo, tmp_path, testbed):
    """Under accelerate launch every process writes its part (rng_state_<rank>.pth) into the staging folder before
    process 0 renames it; resuming both processes from checkpoint-2 repeats steps 3-4 of the run."""
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2.yaml",
              "--num_processes", "2", "--main_process_port", str(free_port()), "recipes/dpo.py", "--config",
              "configs/dpo/testbed.yaml", f"output_dir={out}", "max_steps=4", "per_device_train_batch_size=8",
              *(f"{k}={'null' if v is None else str(v).lower()}" for k, v in DPO_SMALL.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(launch, cwd=repo, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    straight = losses(out)
    for step in (2, 4):
        names = set(os.listdir(out / f"checkpoint-{step}"))
        assert {"trainer_state.json", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint-")]
    again = subprocess.run([*launch, f"resume_from_checkpoint={out}/checkpoint-2"], cwd=repo, capture_output=True,
                           text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = losses(out)
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-6)
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint-")]
