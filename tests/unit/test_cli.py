"""The `align` command, run as a user would (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest


def align(*args, cwd=None, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_help_lists_commands():
    out = align("--help")
    assert out.returncode == 0
    for cmd in ("train", "recipes", "testbed", "quickstart"):
        assert cmd in out.stdout


@pytest.mark.slow
def test_recipes_lists_recipes_and_objectives():
    out = align("recipes")
    assert out.returncode == 0
    for name in ("sft", "dpo", "online_dpo", "xpo", "egpo", "iterative_dpo", "ipo", "hinge", "robust", "rpo", "hdpo",
                 "lrdpo", "online_ipo"):
        assert f"  {name} " in out.stdout, name
    assert "params: beta, alpha" in out.stdout


@pytest.mark.slow
def test_train_help_lists_config_keys():
    out = align("train", "dpo", "--help")
    assert out.returncode == 0
    assert "objective (str" in out.stdout and "model_name_or_path" in out.stdout and "learning_rate" in out.stdout
    # our keys first, then the training arguments
    assert out.stdout.index("model_name_or_path") < out.stdout.index("per_device_train_batch_size")


@pytest.mark.slow
def test_train_help_is_grouped_by_part_and_fits_the_terminal():
    out = align("train", "online_dpo", "--help", env={"COLUMNS": "88"})
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    keys = lines[lines.index("Config keys, by part:") + 1:]
    headings = [line[:-1] for line in keys if line and not line.startswith(" ")]
    assert headings == ["model", "data", "LoRA", "outputs", "prompt", "generation", "rollout", "objective", "online",
                        "trainer"]
    assert max(len(line) for line in lines) <= 88
    assert "xpo_alpha (list[float], default [1e-05])" in out.stdout and "(factory)" not in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nope"],
         "error: unknown recipe 'nope' (available: dpo, egpo, grpo, iterative_dpo, online_dpo, raft, sft, xpo)"),
        (["train", "sft", "--config", "configs/sft/testbed.yaml", "max_stepz=3"],
         "error: unknown config key 'max_stepz' in command line (did you mean 'max_steps'?)"),
        (["train", "sft", "--config", "configs/sft/testbed.yaml", "model_name_or_path=./no/such/model"],
         "error: model_name_or_path: folder './no/such/model' does not exist"),
        (["train", "sft", "--config", "configs/sft/missing.yaml"],
         "error: --config: file 'configs/sft/missing.yaml' does not exist"),
        (["train", "sft", "--config", "nope"],
         "error: --config: no file or shipped config 'nope' for recipe 'sft' (shipped: testbed)"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line(repo, args, message):
    out = align(*args, cwd=repo)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == message


@pytest.mark.slow
def test_shipped_config_by_name_from_any_folder(tmp_path):
    # the shipped configs/sft/testbed.yaml loads from an empty folder (then the typo in the overrides stops it)
    for name in ("testbed", "sft/testbed"):
        out = align("train", "sft", "--config", name, "max_stepz=3", cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines()[-1] == \
            "error: unknown config key 'max_stepz' in command line (did you mean 'max_steps'?)"


@pytest.mark.slow
def test_train_sft_end_to_end(repo, tmp_path, testbed):
    out_dir = tmp_path / "sft"
    out = align("train", "sft", "--config", "configs/sft/testbed.yaml", f"output_dir={out_dir}", "max_steps=4",
                "logging_steps=2", "per_device_train_batch_size=8", "model_name_or_path=testbed:policy", cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "effective batch = per_device_train_batch_size 8 x gradient_accumulation_steps 1 x processes 1 = 8" \
        in out.stdout
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "align_config.yaml").is_file()


def test_testbed_info(testbed):
    out = align("testbed", "info", env={"ALIGN_TESTBED_DIR": str(testbed.root)})
    assert out.returncode == 0 and json.loads(out.stdout)["parameters"] > 2_000_000


def test_error_lines_of_several_processes_never_interleave():
    """The processes of a launch share one stderr: each prints its refusal as one write of one line (print writes
    the text and the newline apart, and two processes' copies ran together in CI: '...cpu2.yamlerror: ...')."""
    code = ("import sys\nfrom align.errors import AlignError, print_error\n"
            "for _ in range(300):\n    print_error(AlignError('x' * 300))\n")
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=write) for _ in range(4)]
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [p.wait() for p in procs] == [0] * 4
    assert lines == ["error: " + "x" * 300] * 1200
