"""The Hub push without training (issue 17 §1): the config keys and their checks, secrets kept out of saved configs,
the exact file selection of a run folder (plain, every_save, merged, iterative), and the upload with the real
``huggingface_hub`` client against the stand-in Hub (tests/hub_server.py): success, a branch, a private repository,
refused, down, no token, offline, a file holding the token, ``align push`` and the background uploader."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from ports import free_port

from align.errors import ConfigError, HubError
from align.hub import (
    PushTarget,
    push_saved,
    select_files,
    upload_in_background,
    wait_background,
)
from align.hub_args import is_secret, public_config

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_StandInToken0123456789abcdef"
RUN = {  # a finished run folder: what it holds, and (comment) whether a push takes it
    "model.safetensors": b"weights", "config.json": "{}", "generation_config.json": "{}",  # yes
    "tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}",  # yes
    "align_config.yaml": "beta: 0.1\n", "README.md": "---\nlicense: apache-2.0\n---\n# card\n",  # yes
    "metrics.jsonl": '{"step": 1}\n', "plots/loss.png": b"\x89PNG loss",  # yes
    "plots/data.csv": "x", "notes.txt": "mine", "runs/events.out.tfevents.1": b"tb",  # no: not a run file
    "ref_logps-0123abcd.pt": b"pickle", "training_args.bin": b"pickle", ".metrics.jsonl.x1.tmp": "half",  # never
    "checkpoint-2/model.safetensors": b"ckpt2", "checkpoint-2/trainer_state.json": "{}",  # every_save
    "checkpoint-2/tokenizer.json": "{}", "checkpoint-2/optimizer.pt": b"o", "checkpoint-2/scheduler.pt": b"s",
    "checkpoint-2/rng_state.pth": b"r", "checkpoint-2/training_args.bin": b"t",  # never
    "checkpoint-4/model.safetensors": b"ckpt4",  # incomplete (no trainer_state.json): never
    ".checkpoint-6.tmp/checkpoint-6/model.safetensors": b"staged",  # never
}
PUSHED = ["README.md", "align_config.yaml", "chat_template.jinja", "config.json", "generation_config.json",
          "metrics.jsonl", "model.safetensors", "plots/loss.png", "tokenizer.json", "tokenizer_config.json"]


def write_tree(root: Path, files: dict) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return write_tree(tmp_path / "run", RUN)


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub, the client pointed at it (online, HF_TOKEN set)."""
    from huggingface_hub import constants

    server = HubServer(free_port(), TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.gate and server.gate.set()
    server.stop()


# --- config keys ---------------------------------------------------------------------------------------------------


def load_dpo(tmp_path, *args):
    from align.config import load_config
    from align.recipe import get_recipe

    return load_config(get_recipe("dpo").config_class, REPO / "configs/dpo/testbed.yaml",
                       [f"output_dir={tmp_path}/out", *args])


def test_hub_keys_defaults_and_transformers_strategies_refused(tmp_path):
    config = load_dpo(tmp_path)
    assert (config.push_to_hub, config.hub_model_id, config.hub_private_repo, config.hub_revision,
            config.hub_strategy.value, config.push_merged) == (False, None, None, None, "end", False)
    config = load_dpo(tmp_path, "push_to_hub=true", "hub_model_id=me/dpo", "hub_strategy=every_save",
                      "hub_revision=exp/run-1", "use_peft=true", "push_merged=true", "hub_private_repo=true")
    assert (config.hub_strategy.value, config.hub_revision, config.push_merged) == ("every_save", "exp/run-1", True)
    with pytest.raises(ConfigError) as err:  # transformers' other strategies are not align's
        load_dpo(tmp_path, "push_to_hub=true", "hub_model_id=me/dpo", "hub_strategy=all_checkpoints")
    assert str(err.value) == ("hub_strategy: must be one of ('end', 'every_save') (end: push once, after the run; "
                              "every_save: also upload each checkpoint in the background), got 'all_checkpoints'")
    for revision in ("a..b", "-x", "has space", "x/"):
        with pytest.raises(ConfigError, match=rf"^hub_revision: '{revision}' is not a valid branch name"):
            load_dpo(tmp_path, "push_to_hub=true", "hub_model_id=me/dpo", f"hub_revision={revision}")


def test_secret_keys():
    secret = ["hub_token", "push_to_hub_token", "token", "wandb_api_key", "client_secret", "db_password"]
    public = ["pad_token", "eos_token", "max_tokens_per_micro_batch", "eval_max_new_tokens", "hub_model_id",
              "include_num_input_tokens_seen", "average_tokens_across_devices"]
    assert [k for k in secret + public if is_secret(k)] == secret
    assert public_config({"hub_token": TOKEN, "pad_token": "<pad>", "beta": 0.1}) == {"pad_token": "<pad>",
                                                                                      "beta": 0.1}


def test_saved_and_pickled_configs_hold_no_token(tmp_path):
    from align.recipe import save_config

    config = load_dpo(tmp_path, "push_to_hub=true", "hub_model_id=me/dpo", f"hub_token={TOKEN}")
    assert config.hub_token == TOKEN  # the run itself has it
    path = Path(save_config(config))
    saved = yaml.safe_load(path.read_text())
    assert "hub_token" not in saved and saved["hub_model_id"] == "me/dpo" and TOKEN not in path.read_text()
    data = pickle.dumps(config)  # what transformers writes as training_args.bin
    assert TOKEN.encode() not in data and pickle.loads(data).hub_token is None


# --- which files ---------------------------------------------------------------------------------------------------


def test_selection_of_a_finished_run(run_dir):
    target = PushTarget("me/run")
    files = select_files(str(run_dir), target)
    assert sorted(files) == PUSHED and files["plots/loss.png"] == str(run_dir / "plots/loss.png")
    files = select_files(str(run_dir), PushTarget("me/run", checkpoints=True))  # every_save: the complete ones
    assert sorted(files) == sorted(PUSHED + ["checkpoint-2/model.safetensors", "checkpoint-2/tokenizer.json",
                                             "checkpoint-2/trainer_state.json"])
    write_tree(run_dir / "merged", {"model.safetensors": b"m", "config.json": "{}", "training_args.bin": b"t"})
    files = select_files(str(run_dir), PushTarget("me/run", merged=True, metrics_file="logs/m.jsonl"))
    assert sorted(files) == sorted([p for p in PUSHED if p != "metrics.jsonl"] + ["merged/config.json",
                                                                                  "merged/model.safetensors"])
    (run_dir / "model.safetensors").unlink()
    with pytest.raises(HubError) as err:
        select_files(str(run_dir), target)
    assert str(err.value) == (f"push to 'me/run' failed: no final model in '{run_dir}' (no weights file such as "
                              "model.safetensors or adapter_model.safetensors): the run has not finished")


def test_selection_of_an_iterative_run(tmp_path):
    iteration = {"done": "", "model.safetensors": b"w", "config.json": "{}", "tokenizer.json": "{}",
                 "metrics.json": "{}", "sampling.json": "{}", "pairs.jsonl": "{}\n", "training_args.bin": b"t",
                 "train/checkpoint-1/model.safetensors": b"c", "train/checkpoint-1/trainer_state.json": "{}",
                 "previous/ref_logps-1.pt": b"p"}
    out = write_tree(tmp_path / "it", {"align_config.yaml": "x: 1\n", "iterations.jsonl": "{}\n",
                                       "metrics.jsonl": "{}\n", "README.md": "# c\n", "iter-2/pairs.jsonl": "{}\n",
                                       **{f"iter-{t}/{k}": v for t in (0, 1) for k, v in iteration.items()}})
    (out / "iter-1/model.safetensors").write_bytes(b"last")
    run = ["README.md", "align_config.yaml", "config.json", "iterations.jsonl", "metrics.jsonl", "model.safetensors",
           "tokenizer.json"]
    files = select_files(str(out), PushTarget("me/it"))
    assert sorted(files) == sorted(run + ["iter-1/metrics.json", "iter-1/pairs.jsonl", "iter-1/sampling.json"])
    assert files["model.safetensors"] == str(out / "iter-1/model.safetensors")  # the last finished iteration's
    files = select_files(str(out), PushTarget("me/it", all_iterations=True))
    per_iter = ["config.json", "metrics.json", "model.safetensors", "pairs.jsonl", "sampling.json", "tokenizer.json"]
    assert sorted(files) == sorted(run + [f"iter-{t}/{n}" for t in (0, 1) for n in per_iter])


# --- the upload ----------------------------------------------------------------------------------------------------


def test_push_uploads_the_selection_once_and_to_a_branch(run_dir, hub, capsys):
    url = push_saved(str(run_dir), "me/run")
    [commit] = hub.ops("commit")
    assert url == f"{hub.url}/me/run/commit/{commit and hub.repos['me/run'].heads['main']}"
    assert commit["files"] == PUSHED and hub.ops("create_repo") == [{"op": "create_repo", "repo": "me/run",
                                                                     "private": None}]
    assert hub.files("me/run") == {p: (run_dir / p).read_bytes() for p in PUSHED}
    assert capsys.readouterr().out == f"pushed 10 files to me/run: {url}\n"
    push_saved(str(run_dir), "me/run")  # nothing changed: the client sends no file again (the Hub's oids)
    assert len(hub.ops("commit")) == 1
    (run_dir / "metrics.jsonl").write_text('{"step": 2}\n')
    push_saved(str(run_dir), "me/run", revision="exp", private=True)
    assert hub.ops("create_branch") == [{"op": "create_branch", "repo": "me/run", "branch": "exp"}]
    assert hub.ops("commit")[-1]["files"] == ["metrics.jsonl"] and hub.ops("commit")[-1]["revision"] == "exp"
    assert hub.files("me/run")["metrics.jsonl"] == b'{"step": 1}\n'  # main is untouched
    assert hub.files("me/run", "exp")["metrics.jsonl"] == b'{"step": 2}\n'
    push_saved(str(run_dir), "me/private-run", private=True)
    assert hub.ops("create_repo")[-1] == {"op": "create_repo", "repo": "me/private-run", "private": True}


def test_failed_pushes_are_one_line_naming_the_repo(run_dir, hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    retry = f"; the run is saved in '{run_dir}', retry with: align push {run_dir} me/run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    hub.refuse = True
    with pytest.raises(HubError) as err:
        push_saved(str(run_dir), "me/run")
    assert str(err.value) == ("push to 'me/run' failed: no write access (403 Forbidden: You don't have the rights to "
                              "create a model under this namespace); check the token's permissions and the "
                              "namespace" + retry)
    hub.refuse = False
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match=r"^push to 'me/run' failed: the Hub refused the token \(401 Unauthorized"):
        push_saved(str(run_dir), "me/run")
    with monkeypatch.context() as no_token:
        no_token.delenv("HF_TOKEN")
        no_token.setattr(huggingface_hub, "get_token", lambda: None)  # no login either
        with pytest.raises(HubError) as err:
            push_saved(str(run_dir), "me/run")
    assert str(err.value) == ("push to 'me/run' failed: no Hub token; set hub_token or HF_TOKEN, or run `hf auth "
                              "login`" + retry)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as err:
        push_saved(str(run_dir), "me/run")
    assert str(err.value) == "push to 'me/run' failed: HF_HUB_OFFLINE is set, so the Hub cannot be reached" + retry
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()
    with pytest.raises(HubError) as err:
        push_saved(str(run_dir), "me/run")
    assert str(err.value).startswith(f"push to 'me/run' failed: cannot reach {hub.url} (ConnectError: ")
    assert str(err.value).endswith(retry) and "\n" not in str(err.value)
    assert hub.ops("commit") == [] and {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_file_holding_the_token_stops_the_push(run_dir, hub):
    (run_dir / "README.md").write_text(f"---\nlicense: mit\n---\ntrained with {TOKEN}\n")
    with pytest.raises(HubError) as err:
        push_saved(str(run_dir), "me/run")
    assert str(err.value) == "push to 'me/run' failed: README.md contains the Hub token; remove it from that file"
    assert hub.ops("commit") == [] and hub.ops("create_repo") == []


def test_align_push_command(run_dir, hub, tmp_path, capsys):
    from align.cli import main

    assert main(["push", str(run_dir), "me/bad--name"]) == 2
    assert capsys.readouterr().err == ("error: REPO_ID: 'me/bad--name' is not a valid Hub repository id (Cannot have "
                                       "-- or .. in repo_id)\n")
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "me/run"]) == 2
    assert capsys.readouterr().err == (f"error: OUTPUT_DIR: '{tmp_path}/empty' has no align_config.yaml, so it is "
                                       "not an align run folder\n")
    assert main(["push", str(run_dir), "me/run", "--merged"]) == 2
    assert capsys.readouterr().err == (f"error: push to 'me/run' failed: push_merged / --merged: '{run_dir}' holds no "
                                       "LoRA adapter (adapter_config.json)\n")
    (run_dir / "align_config.yaml").write_text("push_merged: true\n")  # the run's own selection, without --merged
    assert main(["push", str(run_dir), "me/run"]) == 2
    assert "holds no LoRA adapter (adapter_config.json)" in capsys.readouterr().err
    (run_dir / "align_config.yaml").write_text("hub_strategy: every_save\nmetrics_file: metrics.jsonl\n")
    assert main(["push", str(run_dir), "me/run", "--private", "--revision", "v1"]) == 0
    assert hub.ops("create_repo")[-1]["private"] is True and hub.ops("commit")[-1]["revision"] == "v1"
    assert sorted(hub.files("me/run", "v1")) == sorted(PUSHED + [  # the saved config asked for every_save
        "checkpoint-2/model.safetensors", "checkpoint-2/tokenizer.json", "checkpoint-2/trainer_state.json"])


# --- background uploads --------------------------------------------------------------------------------------------


def wait_for(condition, what: str) -> None:
    for _ in range(1200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def test_background_uploads_one_at_a_time_in_order(run_dir, hub):
    import threading

    hub.gate = threading.Event()
    target = PushTarget("me/run")
    pick = {n: (lambda n=n: {f"{n}/model.safetensors": str(run_dir / "model.safetensors")}) for n in ("c2", "c4")}
    upload_in_background(str(run_dir), target, "c2", pick["c2"])
    upload_in_background(str(run_dir), target, "c4", pick["c4"])  # both queued, neither call waited
    wait_for(lambda: hub.ops("commit_held"), "the first commit reaching the Hub")
    assert [o["files"] for o in hub.ops("preupload")] == [["c2/model.safetensors"]]  # c4 waits its turn
    assert hub.ops("commit") == []
    hub.gate.set()
    uploads = wait_background(str(run_dir))
    assert [c["files"] for c in hub.ops("commit")] == [["c2/model.safetensors"], ["c4/model.safetensors"]]
    assert (uploads.uploaded, uploads.failures) == (["c2", "c4"], 0)
    assert wait_background(str(run_dir)) is None  # retired


def test_background_failures_are_reported_once_and_never_raised(run_dir, hub, capsys):
    hub.refuse = True
    target = PushTarget("me/run")
    for name in ("checkpoint-2", "checkpoint-4"):
        upload_in_background(str(run_dir), target, name, lambda: {"a.json": str(run_dir / "config.json")})
    uploads = wait_background(str(run_dir))
    assert (uploads.uploaded, uploads.failures) == ([], 2)
    assert capsys.readouterr().err == (
        "warning: background upload of checkpoint-2: push to 'me/run' failed: no write access (403 Forbidden: You "
        "don't have the rights to create a model under this namespace); check the token's permissions and the "
        "namespace; training goes on, the final push uploads it again\n")


@pytest.mark.slow
def test_align_push_as_a_user_runs_it_through_hf_endpoint(run_dir, tmp_path):
    """A separate process, the client pointed at the stand-in by HF_ENDPOINT alone."""
    import os
    import subprocess
    import sys

    server = HubServer(free_port(), TOKEN).start()
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")}
    try:
        done = subprocess.run([sys.executable, "-m", "align.cli", "push", str(run_dir), "me/run"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"pushed 10 files to me/run: {server.url}/me/run/commit/")
        assert sorted(server.files("me/run")) == PUSHED
        server.refuse = True
        done = subprocess.run([sys.executable, "-m", "align.cli", "push", str(run_dir), "me/run"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and done.stderr.splitlines() == [
            f"error: push to 'me/run' failed: no write access (403 Forbidden: You don't have the rights to create a "
            f"model under this namespace); check the token's permissions and the namespace; the run is saved in "
            f"'{run_dir}', retry with: align push {run_dir} me/run"]
    finally:
        server.stop()
