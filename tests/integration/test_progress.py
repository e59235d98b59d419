"""Progress on the long waits (align/progress.py): the bar itself, the HF engine ticking it, and the lines a GRPO
(GVM) run, a DPO run and a two-process GRPO run write to stderr: each stage named, at the right totals, quiet with
``disable_tqdm`` and on every process but the main one."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from ports import free_port

from align import progress
from align.config import load_config

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STATE = re.compile(r"(?P<desc>\S.*?): +\d+%\|[^|]*\| (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+)"
                   r"(?:, (?P<gn>\d+)/(?P<gt>\d+) (?P<gunit>\w+))? \[")
OURS = ("GVM estimation", "rollouts (", "evaluation (", "reference log-probs", "old/reference", "weight push")


def states(text: str) -> dict[str, list[tuple]]:
    """Every state a bar wrote, by description, in order: (n, total, unit[, groups done, groups total, unit])."""
    found: dict[str, list[tuple]] = {}
    for piece in re.split(r"[\r\n]", ANSI.sub("", text)):
        m = STATE.match(piece)
        if m:
            state = (int(m["n"]), int(m["total"]), m["unit"])
            if m["gn"] is not None:
                state += (int(m["gn"]), int(m["gt"]), m["gunit"])
            found.setdefault(m["desc"], []).append(state)
    return found


# --- the bar ----------------------------------------------------------------------------------------------------


def test_bar_counts_items_and_groups_and_writes_its_states(capsys):
    with progress.bar("rollouts (round 0)", 32, "completions", show=True, groups=[4] * 8, groups_total=8) as stage:
        progress.advance(12, "completions")
        assert (stage.n, stage.groups_done) == (12, 3)  # 3 prompts' 4 completions each are done, the 4th's not
        progress.advance(3, "prompts")  # another unit: not this bar's
        assert stage.n == 12
        stage.finish()
        assert (stage.n, stage.groups_done) == (32, 8)
    written = states(capsys.readouterr().err)
    assert list(written) == ["rollouts (round 0)"]
    assert written["rollouts (round 0)"][0] == (0, 32, "completions", 0, 8, "prompts")
    assert written["rollouts (round 0)"][-1] == (32, 32, "completions", 8, 8, "prompts")


def test_main_process_share_then_the_gathered_total(capsys):
    # this process generated prompts of 3 and 5 completions; 4 prompts, 16 completions over every process
    stage = progress.bar("stage", 16, "completions", show=True, groups=[3, 5], groups_total=4)
    with stage:
        stage.advance(2)
        assert stage.groups_done == 0
        stage.advance(5)  # 7: the first prompt's 3, not yet the second's 5
        assert (stage.n, stage.groups_done) == (7, 1)
        stage.reach(4)  # never backwards
        stage.advance(1)
        assert (stage.n, stage.groups_done) == (8, 2)
        stage.finish()  # the other processes' shares, gathered
        assert (stage.n, stage.groups_done) == (16, 4)
        stage.advance(5)  # never past the total
        assert stage.n == 16
    assert states(capsys.readouterr().err)["stage"][-1] == (16, 16, "completions", 4, 4, "prompts")


def test_quiet_bars_write_and_count_nothing(capsys):
    with progress.bar("hidden", 8, "rows", show=False) as stage:
        progress.advance(3, "rows")
        stage.finish()
        assert stage.n == 0
    with progress.bar("empty", 0, "rows", show=True) as stage:  # nothing to count: no bar
        stage.finish()
    progress.advance(1, "rows")  # no bar open: nothing happens
    assert capsys.readouterr().err == ""


def test_advance_ticks_the_innermost_bar_of_its_unit(capsys):
    with progress.bar("outer", 10, "rows", show=True) as outer:
        with progress.bar("inner", 4, "completions", show=True) as inner:
            progress.advance(2, "completions")
            progress.advance(1, "rows")  # the innermost bar counts completions: no tick anywhere
            assert (outer.n, inner.n) == (0, 2)
        progress.advance(1, "rows")
        assert outer.n == 1
    written = states(capsys.readouterr().err)
    assert written["inner"][-1] == (2, 4, "completions")  # a nested bar writes its last state before it is cleared
    assert written["outer"][-1] == (1, 10, "rows")


def test_shown_only_on_the_main_process_with_bars_on():
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        assert progress.shown(SimpleNamespace(disable_tqdm=False), True) is True
        assert progress.shown(object(), True) is True  # no disable_tqdm key: shown
        assert progress.shown(SimpleNamespace(disable_tqdm=True), True) is False
        assert progress.shown(SimpleNamespace(disable_tqdm=False), False) is False
        logging.disable_progress_bar()  # what HF_HUB_DISABLE_PROGRESS_BARS=1 does
        assert progress.shown(SimpleNamespace(disable_tqdm=False), True) is False
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def test_hf_engine_ticks_the_open_bar_per_batch(testbed, monkeypatch, capsys):
    from align.modeling import load_model, load_tokenizer
    from align.rollout import HFEngine, SamplingParams

    tok = load_tokenizer(str(testbed.policy))
    engine = HFEngine(load_model(str(testbed.policy)), tok, batch_size=3)
    ticks = []
    real = progress.advance
    monkeypatch.setattr(progress, "advance", lambda n, unit: (ticks.append((n, unit)), real(n, unit)))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("What is 2+3?", "What is 4-1?")]
    with progress.bar("sampling", 5, "completions", show=True, groups=[2, 3]) as stage:
        out = engine.generate(prompts, [2, 3], SamplingParams(max_new_tokens=4, seed=1))
        assert (stage.n, stage.groups_done) == (5, 2)  # the engine's own ticks, no reach() by the caller
    assert len(out) == 5 and ticks == [(3, "completions"), (2, "completions")]
    assert states(capsys.readouterr().err)["sampling"][-1] == (5, 5, "completions", 2, 2, "prompts")


# --- runs -------------------------------------------------------------------------------------------------------

GRPO = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "num_minibatches": 1,
        "max_train_samples": 64, "logging_steps": 1, "allocator": "gvm", "gvm_samples": 4,
        "dataset_test_split": "test", "max_eval_samples": 6, "eval_num_samples": 2, "overwrite_output_dir": True}


@pytest.mark.slow
def test_grpo_gvm_run_shows_every_stage_at_its_totals(repo, tmp_path, testbed, capsys):
    from align.recipes.grpo import GRPORecipeConfig, run

    out = tmp_path / "out"
    run(load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml",
                    {**GRPO, "output_dir": str(out), "disable_tqdm": False}))
    written = states(capsys.readouterr().err)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "rollouts/round" in r]
    assert len(rounds) == 2
    for index, rec in enumerate(rounds):
        # GVM estimation: gvm_samples for each of the round's 4 prompts (all stale: gvm_interval 1)
        assert written[f"GVM estimation: samples (round {index})"][-1] == (16, 16, "completions", 4, 4, "prompts")
        # a gradient norm per accepted estimation sample: sum of p_i x 4 samples
        accepted = round(rec["gvm/p_mean"] * 4 * 4)
        assert accepted > 0
        assert written[f"GVM estimation: gradient norms (round {index})"][-1] == (accepted, accepted, "samples")
        # the round's budget num_generations x prompts, over the prompts GVM did not drop
        kept = 4 - int(rec["allocation/prompts_dropped"])
        assert written[f"rollouts (round {index})"][0] == (0, 16, "completions", 0, kept, "prompts")
        assert written[f"rollouts (round {index})"][-1] == (16, 16, "completions", kept, kept, "prompts")
        assert rec["rollouts/round"] == 16 + 16  # estimation + training rollouts: what the bars counted
    assert written["evaluation (greedy)"][-1] == (6, 6, "completions", 6, 6, "prompts")
    assert written["evaluation (sampled)"][-1] == (12, 12, "completions", 6, 6, "prompts")
    assert not any(d.startswith(("weight push", "old/reference")) for d in written)  # hf engine, beta 0, 1 update

    quiet = tmp_path / "quiet"
    run(load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml",
                    {**GRPO, "max_steps": 1, "output_dir": str(quiet), "disable_tqdm": True}))
    err = capsys.readouterr().err
    assert (quiet / "model.safetensors").is_file()
    assert not [name for name in OURS if name in err], err[-2000:]


@pytest.mark.slow
def test_dpo_reference_passes_count_the_dataset_rows(repo, tmp_path, testbed, capsys):
    from align.recipes.dpo import DPORecipeConfig, build_trainer

    def trainer(name, quiet):
        over = {"output_dir": str(tmp_path / name), "max_steps": 1, "max_train_samples": 24,
                "dataset_test_split": "test", "max_eval_samples": 8, "disable_tqdm": quiet,
                "overwrite_output_dir": True}
        return build_trainer(load_config(DPORecipeConfig, repo / "configs/dpo/testbed.yaml", over))

    shown = trainer("shown", False)
    shown.train()  # both reference passes first, then one step
    written = states(capsys.readouterr().err)
    assert (len(shown.train_dataset), len(shown.eval_dataset)) == (24, 8)
    assert written["reference log-probs"][0] == (0, 24, "rows")
    assert written["reference log-probs"][-1] == (24, 24, "rows")
    assert written["reference log-probs (eval)"][-1] == (8, 8, "rows")

    quiet = trainer("quiet", True)
    ds = quiet.precompute_reference(quiet.train_dataset)  # the same pass, computed (a fresh output_dir: no cache)
    assert ds["ref_chosen_logps"] == pytest.approx(shown.train_dataset["ref_chosen_logps"], abs=1e-6)
    assert "reference log-probs" not in capsys.readouterr().err


@pytest.mark.slow
def test_online_dpo_step_and_win_rate_show_sampling_and_oracle_calls(repo, tmp_path, testbed, capsys):
    from align.recipes.online_dpo import OnlineRecipeConfig, build_trainer

    over = {"output_dir": str(tmp_path / "online"), "max_steps": 1, "per_device_train_batch_size": 4,
            "max_train_samples": 32, "dataset_test_split": "test", "max_eval_samples": 3, "eval_num_samples": 2,
            "logging_steps": 1, "disable_tqdm": False, "overwrite_output_dir": True}
    trainer = build_trainer(load_config(OnlineRecipeConfig, repo / "configs/online_dpo/testbed.yaml", over))
    trainer.train()
    metrics = trainer.evaluate()
    written = states(capsys.readouterr().err)
    # the step: two samples of each of its 4 prompts, then the oracle on the 4 pairs
    assert written["sampling 'a' (step 1)"][-1] == (4, 4, "completions")
    assert written["sampling 'b' (step 1)"][-1] == (4, 4, "completions")
    assert written["oracle 'verifier:accuracy' (step 1)"][-1] == (4, 4, "pairs")
    assert trainer.oracle_calls == 4
    # the win rate: 2 samples of 3 prompts from the policy and from the reference, then 6 pairs judged
    assert written["win rate: sampling (policy, baseline)"][-1] == (12, 12, "completions")
    assert metrics["eval_oracle_calls"] == 6
    assert written["win rate: oracle 'verifier:accuracy'"][-1] == (6, 6, "pairs")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_print_once_with_the_global_totals(repo, tmp_path, testbed):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "recipes/grpo.py",
           "--config", "configs/grpo/testbed.yaml", "max_steps=1", "per_device_train_batch_size=2",
           "num_generations=4", "num_minibatches=1", "max_train_samples=64", "allocator=gvm", "gvm_samples=4",
           "dataset_test_split=null", "disable_tqdm=false", "overwrite_output_dir=true", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = states(proc.stderr)
    rec = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "rollouts/round" in x)
    kept = 4 - int(rec["allocation/prompts_dropped"])
    est, roll = written["GVM estimation: samples (round 0)"], written["rollouts (round 0)"]
    # the whole round (2 processes x 2 prompts), each bar started once: one process wrote them, not two
    assert est[-1] == (16, 16, "completions", 4, 4, "prompts")
    assert roll[-1] == (16, 16, "completions", kept, kept, "prompts")
    assert [s for s in est if s[0] == 0] == [(0, 16, "completions", 0, 4, "prompts")]
    assert [s for s in roll if s[0] == 0] == [(0, 16, "completions", 0, kept, "prompts")]
    accepted = round(rec["gvm/p_mean"] * 4 * 4)
    grads = written["GVM estimation: gradient norms (round 0)"]
    assert grads[-1] == (accepted, accepted, "samples")
    assert [s for s in grads if s[0] == 0] == [(0, accepted, "samples")]
