"""Push at the end of real runs (issue 17 §1), through the recipe entry point, with the real ``huggingface_hub`` client
against the stand-in Hub (tests/hub_server.py): the files a DPO run and a LoRA run with ``push_merged`` upload (the
merged copy equal to base + adapter), nothing forbidden and no token anywhere; a refused push and a down server exit
non-zero with one line naming the repository, the local output intact, and ``align push`` retrying it; every_save
uploading each checkpoint in the background; the iterative driver pushing each iteration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from ports import free_port

from align.recipe import get_recipe, main

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_StandInToken0123456789abcdef"
USER_REPO = "align-tester/dpo-testbed"  # a name without a namespace lands in the token's user's
TINY = ["max_train_samples=32", "per_device_train_batch_size=8", "max_steps=2", "max_eval_samples=8",
        "per_device_eval_batch_size=8", "logging_steps=1", "disable_tqdm=true"]
MODEL = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]
RUN = ["README.md", "align_config.yaml", "metrics.jsonl"]
FORBIDDEN = ("ref_logps-", "training_args.bin", "optimizer", "scheduler.pt", "rng_state", ".tmp")


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny models: one intra-op thread (see the conftest fixture)."""


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = HubServer(free_port(), TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the token comes from the config (hub_token=...)
    yield server
    server.stop()


def train(recipe: str, config: str, out: Path, *args: str) -> int:
    return main(get_recipe(recipe), ["--config", str(REPO / config), f"output_dir={out}", "push_to_hub=true",
                                     f"hub_token={TOKEN}", *args])


def plots(out: Path) -> list[str]:
    found = sorted(f"plots/{p.name}" for p in (out / "plots").glob("*.png"))
    assert found, "the run wrote no plots"
    return found


def local_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def assert_clean(server: HubServer, out: Path) -> None:
    """Nothing forbidden uploaded, and the token in no uploaded file and no file of the run."""
    for commit in server.ops("commit"):
        for path, data in commit["contents"].items():
            assert not any(bad in path for bad in FORBIDDEN), path
            assert TOKEN.encode() not in data, path
    for path, data in local_files(out).items():
        assert TOKEN.encode() not in data, path


@pytest.mark.slow
def test_dpo_run_pushes_model_tokenizer_config_metrics_plots_and_card(hub, tmp_path, capsys):
    out = tmp_path / "dpo"
    code = train("dpo", "configs/dpo/testbed.yaml", out, *TINY, "hub_model_id=dpo-testbed")
    assert code == 0, capsys.readouterr().err
    [create] = hub.ops("create_repo")  # once, at the end: transformers' Trainer created nothing at its start
    assert create == {"op": "create_repo", "repo": USER_REPO, "private": None}
    [commit] = hub.ops("commit")
    assert commit["repo"] == USER_REPO and commit["files"] == sorted(MODEL + RUN + plots(out))
    assert hub.files(USER_REPO) == {p: (out / p).read_bytes() for p in commit["files"]}
    assert (out / "training_args.bin").is_file() and list(out.glob("ref_logps-*.pt"))  # there, and not pushed
    assert_clean(hub, out)
    saved = (out / "align_config.yaml").read_text()
    assert "hub_token" not in saved and "hub_model_id: dpo-testbed" in saved
    assert TOKEN.encode() not in (out / "training_args.bin").read_bytes()  # the pickled arguments hold no token
    assert f"pushed {len(commit['files'])} files to dpo-testbed: {hub.url}/{USER_REPO}/commit/" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_lora_run_pushes_the_adapter_and_a_merged_copy(hub, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.modeling import load_model

    out = tmp_path / "lora"
    code = train("dpo", "configs/dpo/testbed.yaml", out, *TINY, "hub_model_id=me/lora", "use_peft=true",
                 "push_merged=true", "learning_rate=5e-3")
    assert code == 0, capsys.readouterr().err
    [commit] = hub.ops("commit")
    adapter = ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
               "tokenizer_config.json"]
    assert commit["files"] == sorted(adapter + RUN + plots(out) + [f"merged/{n}" for n in MODEL])
    assert hub.files("me/lora")["merged/model.safetensors"] == (out / "merged/model.safetensors").read_bytes()
    assert_clean(hub, out)
    # the merged copy is base + adapter: the same logits as the adapter on its base, not the base's own
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with_adapter = PeftModel.from_pretrained(load_model("testbed:policy"), str(out)).eval()
    ids = torch.tensor([[5, 17, 3, 42, 8, 11, 2, 29]])
    with torch.no_grad():
        got, want = merged(ids).logits, with_adapter(ids).logits
        with with_adapter.disable_adapter():
            base = with_adapter(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - base).abs().max().item() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["refused", "down"])
def test_failed_push_keeps_the_run_and_align_push_retries_it(failure, hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from align.cli import main as cli

    out = tmp_path / "run"
    if failure == "refused":
        hub.refuse = True
        code = train("dpo", "configs/dpo/testbed.yaml", out, *TINY, "hub_model_id=me/run")
        cause = ("no write access (403 Forbidden: You don't have the rights to create a model under this "
                 "namespace); check the token's permissions and the namespace")
    else:  # SFT: transformers' own trainer class (TRL's SFTTrainer), with align's push
        hub.stop()
        code = train("sft", "configs/sft/testbed.yaml", out, "max_train_samples=32", "per_device_train_batch_size=8",
                     "max_steps=2", "logging_steps=1", "disable_tqdm=true", "hub_model_id=me/run")
        cause = f"cannot reach {hub.url} (ConnectError: [Errno 111] Connection refused)"
    err = capsys.readouterr().err
    assert code == 2 and error_lines(err) == [
        f"error: push to 'me/run' failed: {cause}; the run is saved in '{out}', retry with: align push {out} me/run"]
    assert hub.ops("commit") == []
    kept = local_files(out)  # the trained model, its card and records are there and whole
    assert {*MODEL, *RUN} <= set(kept) and plots(out)
    assert AutoModel(out).config.model_type == "llama"

    retry = HubServer(free_port(), TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", retry.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # align push takes the login's token, never a saved one
    try:
        assert cli(["push", str(out), "me/run"]) == 0
        [commit] = retry.ops("commit")
        assert commit["files"] == sorted(MODEL + RUN + plots(out))  # the same selection as the run's own push
        assert retry.files("me/run") == {p: kept[p] for p in commit["files"]}
        assert local_files(out) == kept
        assert_clean(retry, out)
    finally:
        retry.stop()


def AutoModel(folder: Path):  # noqa: N802 - reads like the transformers class it wraps
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow
def test_every_save_uploads_each_checkpoint_in_the_background(hub, tmp_path, capsys):
    out = tmp_path / "saves"
    code = train("dpo", "configs/dpo/testbed.yaml", out, *[a for a in TINY if a != "max_steps=2"], "max_steps=4",
                 "save_strategy=steps", "save_steps=2", "hub_model_id=me/saves", "hub_strategy=every_save")
    assert code == 0, capsys.readouterr().err
    commits = hub.ops("commit")
    assert [c["summary"] for c in commits] == ["align: upload checkpoint-2", "align: upload checkpoint-4",
                                               "align: upload saves"]
    ckpt = sorted(p.name for p in (out / "checkpoint-2").iterdir() if not any(b in p.name for b in FORBIDDEN))
    assert {"model.safetensors", "trainer_state.json"} <= set(ckpt)
    assert {p.name for p in (out / "checkpoint-2").iterdir()} > set(ckpt)  # optimizer, RNG... stay local
    for step, commit in zip((2, 4), commits):
        assert commit["files"] == [f"checkpoint-{step}/{n}" for n in ckpt]
    assert commits[2]["files"] == sorted(MODEL + RUN + plots(out))  # the checkpoints are there unchanged already
    assert sorted(hub.files("me/saves")) == sorted(MODEL + RUN + plots(out) + [
        f"checkpoint-{s}/{n}" for s in (2, 4) for n in ckpt])
    assert_clean(hub, out)


@pytest.mark.slow
def test_iterative_run_pushes_each_iteration_and_the_last_model(hub, tmp_path, capsys):
    out = tmp_path / "iter"
    code = train("iterative_dpo", "configs/iterative/testbed-ilr-dpo.yaml", out, "max_train_samples=16",
                 "max_eval_samples=8", "eval_num_samples=2", "max_steps=2", "max_completion_length=12",
                 "per_device_train_batch_size=8", "iterations=2", "disable_tqdm=true", "hub_model_id=me/iter",
                 "push_every_iteration=true")
    assert code == 0, capsys.readouterr().err
    commits = hub.ops("commit")
    assert [c["summary"] for c in commits] == ["align: upload iter-0", "align: upload iter-1", "align: upload iter"]
    records = ["metrics.json", "pairs.jsonl", "sampling.json"]
    model = [n for n in MODEL if (out / "iter-0" / n).is_file()]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(model)
    for t in (0, 1):
        assert commits[t]["files"] == sorted(f"iter-{t}/{n}" for n in model + records)
    stored = hub.files("me/iter")
    assert stored["model.safetensors"] == (out / "iter-1/model.safetensors").read_bytes()  # the last iteration
    assert stored["iterations.jsonl"] == (out / "iterations.jsonl").read_bytes()
    assert not [p for p in stored if "/train/" in p or p.startswith("train/")]  # no round's checkpoints
    assert_clean(hub, out)
