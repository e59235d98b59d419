"""Experiment tracking (align/tracking.py): tensorboard, trackio and wandb (offline) written for real and read back.

One tracker run per training run, the final evaluation inside it; every value equal to metrics.jsonl at the same
step; the iterative driver on one continuous step axis with its per-iteration metrics; the entanglement monitor's
step-0 baseline; the sampled-completions tables of RL and online runs; a resumed tensorboard run without the
events logged after its checkpoint; bad ``report_to`` values as one line with the install command."""

import glob
import json
import os
import sqlite3
import subprocess
import sys
import tomllib

import pytest

from align.tracking import PINS, TRACKERS, TensorBoardTracker, TrackingCallback, attach, markdown_table


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny models: one intra-op thread (see the conftest fixture)."""


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tensorboard_events(folder):
    """(scalars: tag -> [(step, value)], texts: tag -> [(step, text)]) of every event file in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in
                                                  acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def tracker_name(key: str) -> str:
    """A metrics.jsonl key as the trackers name it (transformers' rewrite_logs)."""
    return "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key


def numeric(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_cli(repo, tmp_path, recipe, args, env):
    """``align train`` in a subprocess (trackio and wandb read their folders from the environment at import)."""
    cmd = [sys.executable, "-m", "align.cli", "train", recipe, *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- a GRPO (GVM) run with tensorboard and trackio -------------------------------------------------------------

SECRET = "hf_notarealtoken123"  # a hub_token on the command line: never in a tracker's copy of the config


@pytest.fixture(scope="module")
def grpo_tracked(repo, testbed, tmp_path_factory):
    """GRPO with GVM, 2 rounds x 2 optimizer steps, logging every step, the completions table every 2 rounds (so
    round 0 only), the final evaluation on 8 prompts; trackio's database in the test's folder."""
    tmp = tmp_path_factory.mktemp("grpo-tracked")
    out = tmp / "out"
    train_cli(repo, tmp, "grpo", [
        "--config", "configs/grpo/testbed.yaml", f"output_dir={out}", "report_to=[tensorboard,trackio]",
        "allocator=gvm", "gvm_samples=4", "max_steps=4", "per_device_train_batch_size=4", "num_generations=4",
        "num_minibatches=2", "logging_steps=1", "max_train_samples=32", "max_eval_samples=8", "eval_num_samples=0",
        "log_completions_steps=2", "disable_tqdm=true", f"hub_token={SECRET}"], {"TRACKIO_DIR": str(tmp / "trackio")})
    return out, tmp / "trackio"


@pytest.mark.slow
def test_grpo_tensorboard_holds_every_metric_at_its_step(grpo_tracked):
    out, _ = grpo_tracked
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 4]  # 4 steps, the train summary, the evaluation
    assert len(glob.glob(str(out / "runs" / "events.out.tfevents.*"))) == 1  # one writer: one run
    scalars, texts = tensorboard_events(out / "runs")
    for r in records:
        for key, value in numeric(r).items():
            assert (r["step"], pytest.approx(value, rel=1e-6, abs=1e-7)) in scalars[tracker_name(key)], key
    for prefix in ("allocation/", "rewards/", "gvm/", "rollouts/", "timing/"):
        assert any(t.startswith("train/" + prefix) for t in scalars), prefix
    assert [s for s, _ in scalars["train/allocation/max"]] == [1, 3]  # each round's first step
    assert [s for s, _ in scalars["eval/reward"]] == [4]  # the final evaluation, in the same run
    # The completions table of round 0 (its first step), as markdown: one row per training rollout.
    [(step, table)] = texts["completions"]
    lines = table.splitlines()
    assert step == 1 and lines[0] == "| step | prompt | completion | reward | accuracy | advantage |"
    assert len(lines) == 2 + 16 and all(line.startswith("| 1 | ") for line in lines[2:])
    assert "allocator" in texts["config"][0][1] and SECRET not in texts["config"][0][1]


@pytest.mark.slow
def test_grpo_trackio_one_run_equal_to_metrics_jsonl(grpo_tracked):
    out, trackio_dir = grpo_tracked
    records = read_jsonl(out / "metrics.jsonl")
    db = sqlite3.connect(trackio_dir / "huggingface.db")  # project: transformers' default `project`
    rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
    runs = {name for name, _, _ in rows}
    assert len(runs) == 1 and db.execute("SELECT COUNT(*) FROM configs").fetchone()[0] == 1
    assert json.loads((out / "tracking.json").read_text())["trackio"] == next(iter(runs))
    logged = [(step, json.loads(m)) for _, step, m in rows]
    scalars = [(s, m) for s, m in logged if "completions" not in m]
    for r in records:  # each Trainer log is one trackio log, exactly (JSON floats)
        assert (r["step"], {tracker_name(k): v for k, v in numeric(r).items()}) in scalars
    assert len(scalars) == len(records)
    assert [s for s, m in scalars if "eval/reward" in m] == [4]
    config = json.loads(db.execute("SELECT config FROM configs").fetchone()[0])
    assert config["allocator"] == "gvm" and config["log_completions_steps"] == 2 and SECRET not in json.dumps(config)
    # The table: round 0's 16 training rollouts, at step 1 only; its rewards are the round's `reward` metric.
    tables = [(s, m["completions"]["_value"]) for s, m in logged if "completions" in m]
    assert [s for s, _ in tables] == [1]
    table = tables[0][1]
    assert len(table) == 16 and list(table[0]) == ["step", "prompt", "completion", "reward", "accuracy", "advantage"]
    assert all(t["reward"] == t["accuracy"] in (0.0, 1.0) and t["completion"] for t in table)
    assert sum(t["reward"] for t in table) / 16 == pytest.approx(records[0]["reward"])


# --- the iterative driver: one step axis, per-iteration metrics -------------------------------------------------


@pytest.mark.slow
def test_iterative_steps_continue_across_rounds_with_iteration_metrics(repo, testbed, tmp_path, capsys,
                                                                      monkeypatch):
    from align.config import load_config
    from align.recipes.iterative_dpo import IterativeRecipeConfig, run

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    config = load_config(IterativeRecipeConfig, repo / "configs/iterative/testbed-ilr-dpo.yaml", {
        "output_dir": str(out), "iterations": 2, "max_train_samples": 16, "max_eval_samples": 8,
        "eval_num_samples": 2, "max_steps": 4, "max_completion_length": 12, "per_device_train_batch_size": 8,
        "logging_steps": 1, "report_to": ["tensorboard"], "disable_tqdm": True})
    records = run(config)["iterations"]
    scalars, _ = tensorboard_events(out / "runs")
    assert len(glob.glob(str(out / "runs" / "events.out.tfevents.*"))) == 1
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]  # round 1 continues at 5
    for key in ("pairs", "ties_skipped", "oracle_calls", "samples/mean_length", "pairs/chosen_length",
                "pairs/rejected_length", "train/loss", "eval/win_rate", "eval/policy_length"):
        assert scalars[f"iteration/{key}"] == [(4, pytest.approx(records[0][key], rel=1e-6)),
                                               (8, pytest.approx(records[1][key], rel=1e-6))], key
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration ")]
    assert len(printed) == 2
    for t, (line, r) in enumerate(zip(printed, records, strict=True)):
        assert line.startswith(f"iteration {t} ({t + 1}/2): prompts 16, pairs {r['pairs']}, ties_skipped "
                               f"{r['ties_skipped']}, oracle_calls {r['oracle_calls']}, samples/mean_length "
                               f"{r['samples/mean_length']:.4g}, pairs/chosen_length ")
        assert f", train/loss {r['train/loss']:.4g}, train/steps 4, eval/win_rate {r['eval/win_rate']:.4g}, " in line


# --- the entanglement monitor's baseline ------------------------------------------------------------------------


@pytest.mark.slow
def test_entanglement_baseline_reaches_tensorboard_at_step_0(repo, testbed, tmp_path, monkeypatch):
    from align.config import load_config
    from align.recipes.dpo import DPORecipeConfig, run

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    run(load_config(DPORecipeConfig, repo / "configs/dpo/testbed.yaml", {
        "output_dir": str(out), "max_steps": 4, "logging_steps": 2, "per_device_train_batch_size": 8,
        "max_train_samples": 64, "max_eval_samples": 16, "entanglement_steps": 2, "entanglement_probe_size": 4,
        "entanglement_params": ["lm_head"], "report_to": ["tensorboard"], "disable_tqdm": True}))
    records = read_jsonl(out / "metrics.jsonl")
    baseline = records[0]
    assert baseline["step"] == 0 and "loss" not in baseline and "entanglement/observed_chosen_up" not in baseline
    scalars, _ = tensorboard_events(out / "runs")
    assert [s for s, _ in scalars["train/entanglement/ideal"]] == [0, 2, 4]
    for key in ("ideal", "both_down", "both_up", "inverted", "cos_median", "logps_chosen"):
        assert scalars[f"train/entanglement/{key}"][0] == (0, pytest.approx(baseline[f"entanglement/{key}"], rel=1e-6))
    assert [s for s, _ in scalars["eval/loss"]] == [4]  # the evaluation after train(), the same writer


# --- online DPO with wandb, offline -----------------------------------------------------------------------------


def wandb_records(path):
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log records (32 KiB blocks; a record's
    pieces FULL=1 or FIRST=2, MIDDLE=3, LAST=4) of W&B protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@pytest.mark.slow
def test_online_dpo_wandb_offline_run_and_completions_table(repo, testbed, tmp_path):
    out = tmp_path / "out"
    train_cli(repo, tmp_path, "online_dpo", [
        "--config", "configs/online_dpo/testbed.yaml", f"output_dir={out}", "report_to=[wandb]", "max_steps=2",
        "per_device_train_batch_size=8", "logging_steps=1", "max_train_samples=16", "max_eval_samples=4",
        "eval_num_samples=1", "log_completions_steps=2", "disable_tqdm=true"],
        {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_DISABLED": "", "WANDB_SILENT": "true"})
    [folder] = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))  # one run, the evaluation included
    [path] = glob.glob(os.path.join(folder, "run-*.wandb"))
    history = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            assert json.loads((out / "tracking.json").read_text())["wandb"] == record.run.run_id
    records = read_jsonl(out / "metrics.jsonl")
    for r in records:
        row = next(h for h in history if h["train/global_step"] == r["step"] and
                   all(tracker_name(k) in h for k in numeric(r)))
        assert {k: row[tracker_name(k)] for k in numeric(r)} == numeric(r)
    assert [h["train/global_step"] for h in history if "eval/win_rate" in h] == [2]
    assert [h["train/global_step"] for h in history if "train/oracle/calls" in h] == [1, 2, 2]
    # The completions table every 2 steps: step 1's only (of 2), its 8 pairs, labelled or tied.
    [table_row] = [h for h in history if "completions/_type" in h]  # wandb flattens the table's reference
    assert table_row["train/global_step"] == 1 and table_row["completions/_type"] == "table-file"
    assert table_row["completions/nrows"] == 8
    [table_file] = glob.glob(os.path.join(folder, "files", "media", "table", "completions_*.table.json"))
    table = json.loads(open(table_file).read())
    assert table["columns"] == ["step", "prompt", "chosen", "rejected", "preference", "weight"]
    assert len(table["data"]) == 8 and all(row[0] == 1 and row[1] for row in table["data"])
    assert all(row[4] in (0.5, 1.0) and row[5] == float(row[4] == 1.0) for row in table["data"])
    assert sum(row[5] for row in table["data"]) / 8 == pytest.approx(records[0]["pairs/labelled"])


# --- resumed and fresh tensorboard runs in one folder -----------------------------------------------------------


class Config:
    def __init__(self, out):
        self.output_dir, self.report_to, self.project, self.run_name = str(out), ["tensorboard"], "p", None


def test_tensorboard_resume_drops_events_after_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr("align.tracking.tracked_config", lambda config: {"report_to": config.report_to})
    first = TensorBoardTracker(Config(tmp_path), 0, None)
    for step in range(1, 6):  # killed at step 5, its last checkpoint at step 3
        first.log({"train/loss": float(step)}, step)
    first.close()
    resumed = TensorBoardTracker(Config(tmp_path), 3, None)
    for step in (4, 5, 6):
        resumed.log({"train/loss": 10.0 * step}, step)
    resumed.close()
    scalars, _ = tensorboard_events(tmp_path / "runs")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    fresh = TensorBoardTracker(Config(tmp_path), 0, None)  # overwrite_output_dir: a new run from step 0
    fresh.log({"train/loss": 7.0}, 1)
    fresh.close()
    scalars, _ = tensorboard_events(tmp_path / "runs")
    assert scalars["train/loss"] == [(1, 7.0)]


# --- the callback: one run for every Trainer of a run, offsets, resume ids --------------------------------------


class Recorder:
    opened = []

    def __init__(self, config, start, resume_id):
        self.logs, self.id, self.closed = [], f"run-{len(Recorder.opened)}", False
        Recorder.opened.append((start, resume_id, self))

    def log(self, metrics, step):
        self.logs.append((step, metrics))

    def table(self, key, columns, rows, step):
        self.logs.append((step, {key: (columns, rows)}))

    def close(self):
        self.closed = True


class State:
    def __init__(self, step):
        self.global_step, self.is_world_process_zero = step, True


def test_callback_offsets_steps_opens_once_and_resumes_by_id(tmp_path, monkeypatch):
    monkeypatch.setitem(TRACKERS, "tensorboard", Recorder)
    Recorder.opened = []
    cb = TrackingCallback(Config(tmp_path))
    cb.on_train_begin(None, State(0), None)
    cb.on_log(None, State(2), None, logs={"loss": 0.5, "rewards/accuracy/mean": 1, "flag": True, "note": "x"})
    cb.step_offset = 4  # the iterative driver's second round
    cb.on_train_begin(None, State(0), None)
    cb.on_log(None, State(1), None, logs={"eval_win_rate": 0.75})
    cb.close()
    [(start, resume_id, tracker)] = Recorder.opened
    assert (start, resume_id, tracker.closed) == (0, None, True)
    assert tracker.logs == [(2, {"train/loss": 0.5, "train/rewards/accuracy/mean": 1}), (5, {"eval/win_rate": 0.75})]
    assert json.loads((tmp_path / "tracking.json").read_text()) == {"tensorboard": "run-0"}
    # A resumed run (its first step after the checkpoint's) continues the tracker run tracking.json names.
    again = TrackingCallback(Config(tmp_path))
    again.on_train_begin(None, State(3), None)
    assert Recorder.opened[1][:2] == (3, "run-0")
    assert TrackingCallback(Config(tmp_path)).names == ["tensorboard"]
    assert TrackingCallback(type("C", (), {"report_to": "none"})()).names == []


def test_attach_swaps_transformers_callbacks_for_one_shared_callback(tmp_path):
    from transformers.integrations.integration_utils import TensorBoardCallback
    from transformers.trainer_callback import CallbackHandler, PrinterCallback

    class Trainer:
        def __init__(self, callbacks):
            self.callback_handler = CallbackHandler(callbacks, None, None, None, None)
            self.args = Config(tmp_path)

    shared = TrackingCallback(Config(tmp_path))
    first = Trainer([PrinterCallback(), TensorBoardCallback()])
    assert attach(first, shared) is shared and attach(first, shared) is shared
    assert [type(c) for c in first.callback_handler.callbacks] == [TrackingCallback, PrinterCallback]
    second = Trainer([TensorBoardCallback(), TrackingCallback(Config(tmp_path))])
    attach(second, shared)  # a round of the same run: the run's callback replaces any other
    assert second.callback_handler.callbacks == [shared]
    own = Trainer([TensorBoardCallback()])
    made = attach(own)
    assert own.callback_handler.callbacks == [made] and made.names == ["tensorboard"] and attach(own) is made


def test_markdown_table_escapes_cells():
    assert markdown_table(["prompt", "reward"], [["a|b\nc", 0.123456], ["d", 1]]) == (
        "| prompt | reward |\n|---|---|\n| a\\|b<br>c | 0.1235 |\n| d | 1 |")


# --- bad input: one line, before any model loads -----------------------------------------------------------------


def cli_error(repo, capsys, *overrides):
    from align.recipe import get_recipe, main

    code = main(get_recipe("dpo"), ["--config", str(repo / "configs/dpo/testbed.yaml"), *overrides])
    err = capsys.readouterr().err
    return code, err


def test_unknown_report_to_is_one_line(repo, capsys, no_model_loads):
    code, err = cli_error(repo, capsys, "report_to=[tensorboard,nosuch]")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: report_to: unknown logger 'nosuch' (known: azure_ml, comet_ml, mlflow, ")
    assert err.endswith(", none, all)\n")


@pytest.mark.parametrize("name", ["tensorboard", "trackio", "wandb"])
def test_missing_tracker_names_the_install_command(repo, capsys, monkeypatch, no_model_loads, name):
    import align.tracking

    monkeypatch.setattr(align.tracking, "is_installed", lambda n: n != name)
    code, err = cli_error(repo, capsys, f"report_to=[{name}]")
    assert code == 2
    assert err == (f"error: report_to: '{name}' is not installed (pip install -e '.[tracking]' from a clone, or pip "
                   f"install {PINS[name]}), or use report_to=none\n")


def test_log_completions_steps_must_not_be_negative(repo):
    from align.config import load_config
    from align.errors import ConfigError
    from align.recipes.grpo import GRPORecipeConfig

    with pytest.raises(ConfigError, match=r"^log_completions_steps: must be >= 0 \(0 = off\), got -1$"):
        load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml", {"log_completions_steps": -1})


def test_tracking_extra_pins_the_installed_trackers(repo):
    from importlib.metadata import version

    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tracking"] == sorted(PINS.values())
    assert {"tensorboard==2.21.0", "trackio==0.43.0"} <= set(extras["dev"])
    assert all(version(name) == pin.split("==")[1] for name, pin in PINS.items())
