"""The model card (issue 17 §2): README.md in every run's output folder, written by align.recipe.finish_run.

The fast tests build a card from a real recipe config and a hand-made result; the slow ones train tiny testbed runs
(DPO, GRPO with GVM allocation, LoRA DPO) through ``align.recipe.main`` and check the card against what the run
wrote: the YAML header, the settings that differ from the defaults, the metrics table against metrics.jsonl, the
citations, the reproduce command (re-parsed to the same config) and that no token appears.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from ports import free_port

from align.card import base_model, write_model_card
from align.citations import METHODS, methods_of
from align.config import read_yaml, to_dict
from align.metrics import read_jsonl
from align.recipe import get_recipe, main, parse
from align.run_info import redact_argv, run_info

TOKEN = "hf_" + "Zq7xW" * 7  # a made-up access token: it must never reach the card


# --- reading a card back ---------------------------------------------------------------------------------------


def read_card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "the card starts with a YAML header between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def section(body: str, heading: str) -> str:
    """The text under ``heading`` (e.g. "### Final metrics") up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = body.index(heading + "\n") + len(heading) + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", body[start:], re.M)]
    return body[start:start + ends[0]] if ends else body[start:]


def table(body: str, heading: str) -> list[list[str]]:
    """The rows (cells without backticks) of the first table under ``heading``, header row excluded."""
    lines = [line for line in section(body, heading).splitlines() if line.startswith("|")]
    return [[c.strip().strip("`") for c in line.strip("|").split(" | ")] for line in lines[2:]]


def bibtex_keys(body: str) -> list[str]:
    return re.findall(r"```bibtex\n@\w+\{([^,]+),", body)


def command(body: str) -> list[str]:
    return shlex.split(re.search(r"```bash\n(.*?)\n```", section(body, "## Reproduce"), re.S).group(1))


def given_keys(config_file, overrides: dict) -> dict:
    """The settings a run was given (its YAML file, then the overrides), raw."""
    return {**read_yaml(config_file), **overrides}


def changed_by_hand(recipe: str, config_file, overrides: dict) -> set[str]:
    """The keys the run changed: those given whose value is not the recipe config's default (checked against the
    default instance's values, the given value parsed as the config parses it)."""
    cls = get_recipe(recipe).config_class
    defaults = to_dict(cls())
    parsed = to_dict(parse(get_recipe(recipe), ["--config", str(config_file), *(f"{k}={v}" for k, v in
                                                                                 overrides.items())]))
    return {k for k in given_keys(config_file, overrides) if parsed[k] != defaults[k] and k != "hub_token"}


def metrics_rows(body: str) -> dict[str, tuple[str, str, str]]:
    """metric -> (last train value, its step, eval value) from the card's final-metrics table."""
    return {row[0]: tuple(row[1:]) for row in table(body, "### Final metrics")}


# --- fast: a card from a hand-made result ----------------------------------------------------------------------


def test_card_from_a_hand_made_result(repo, tmp_path):
    out = tmp_path / "out"
    argv = ["--config", str(repo / "configs/dpo/testbed.yaml"), f"output_dir={out}", "beta=0.2", "objective=rpo",
            "eta=0.1", "sft_norm=mean", f"hub_token={TOKEN}"]
    config = parse(get_recipe("dpo"), argv)
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "metrics.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    records = [{"step": 55, "epoch": 0.8, "loss": 0.6, "rewards/accuracies": 0.7, "gvm/p_mean": 0.25},
               {"step": 60, "epoch": 0.9, "loss": 0.58, "rewards/accuracies": 0.72, "learning_rate": 5e-4},
               {"step": 60, "epoch": 0.9, "eval_loss": 0.55, "eval_rewards/accuracies": 0.75},
               {"step": 60, "epoch": 0.9, "train_runtime": 12.5, "train_loss": 0.61}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {"output_dir": str(out), "train_runtime": 12.5, "train_loss": 0.61, "eval_loss": 0.55,
              "eval_rewards/accuracies": 0.75, "rows": {"train": 1024, "eval": 64}}
    write_model_card(str(out), config, result, run_info("dpo", argv, config, result, 83.2))
    header, body = read_card(out)

    assert header == {"library_name": "transformers", "license": "apache-2.0", "model_name": "out",
                      "pipeline_tag": "text-generation", "tags": ["align", "generated_from_trainer", "dpo", "rpo"]}
    changed = {row[0]: row[1:] for row in table(body, "### Hyper-parameters")}
    assert set(changed) == {  # testbed.yaml's keys that differ from DPORecipeConfig's defaults, and the overrides
        "beta", "dataset_name", "dataset_test_split", "eta", "learning_rate", "logging_steps", "lr_scheduler_type",
        "max_eval_samples", "max_length", "max_steps", "max_train_samples", "model_name_or_path", "objective",
        "output_dir", "per_device_eval_batch_size", "per_device_train_batch_size", "save_strategy", "seed",
        "sft_norm"}
    assert changed["beta"] == ["0.2", "0.1"] and changed["objective"] == ["rpo", "dpo"]
    assert changed["learning_rate"] == ["0.0005", "1e-06"]
    assert metrics_rows(body) == {"loss": ("0.58", "60", "0.55"), "rewards/accuracies": ("0.72", "60", "0.75"),
                                  "gvm/p_mean": ("0.25", "55", ""), "learning_rate": ("0.0005", "60", "")}
    assert table(body, "### Run totals") == [["train_runtime", "12.5"], ["train_loss", "0.61"]]
    assert table(body, "### Data") == [["train", "testbed:preference", "train", "1024"],
                                       ["eval", "testbed:preference", "test", "64"]]
    assert "- Wall time: 1 min 23 s (83.2 s)" in body
    assert "![metrics](plots/metrics.png)" in body
    assert bibtex_keys(body) == ["liu2024provably", "vonwerra2020trl"]  # RPO's paper, then TRL
    assert "https://huggingface.co/papers/2405.16436" in body
    cmd = command(body)
    assert cmd[:3] == ["align", "train", "dpo"] and not any("hub_token" in t for t in cmd)
    assert to_dict(parse(get_recipe("dpo"), cmd[3:])) == {**to_dict(config), "hub_token": None}
    text = (out / "README.md").read_text()
    assert TOKEN not in text and "hf_" not in text


def test_redact_argv_drops_every_form_of_a_secret_override():
    argv = ["--config", "x.yaml", "hub_token=a", "beta=0.2", "--hub_token", "b", "--hub-token=c", "--seed", "3",
            "--vllm_api_key", "--use_peft", "pad_token=<pad>"]
    assert redact_argv(argv) == ["--config", "x.yaml", "beta=0.2", "--seed", "3", "--use_peft", "pad_token=<pad>"]


def test_every_objective_and_method_has_a_paragraph_and_its_papers_bibtex():
    from align.objectives import registry

    shipped = [n for n, spec in registry().items() if spec.fn.__module__.startswith("align.objectives.")]
    assert set(shipped) <= set(METHODS), f"objectives without a card entry: {set(shipped) - set(METHODS)}"
    keys = set()
    for name, method in METHODS.items():
        assert len(method.explanation) > 150, name
        if method.bibtex is None:
            assert name == "sft"
            continue
        key = re.match(r"@\w+\{([^,]+),\n", method.bibtex).group(1)
        assert method.bibtex.count("{") == method.bibtex.count("}"), name
        assert re.search(r"eprint\s+= \{(.+?)\}", method.bibtex).group(1) == method.arxiv, name
        assert re.search(r"title\s+= \{\{(.+)\}\}", method.bibtex).group(1) == method.paper, name
        keys.add(key)
    assert len(keys) == 20  # 23 entries: sft has none, dapo/dynamic and pairnorm/entanglement share a paper


@pytest.mark.parametrize("recipe, config_file, overrides, expected", [
    ("grpo", "configs/grpo/testbed.yaml", {}, ["grpo", "dapo"]),
    ("grpo", "configs/grpo/testbed.yaml", {"allocator": "gvm"}, ["grpo", "dapo", "gvm"]),
    ("grpo", "configs/grpo/testbed.yaml", {"loss_type": "dr_grpo", "scale_rewards": "none"}, ["grpo", "dr_grpo"]),
    ("raft", "configs/raft/testbed.yaml", {"allocator": "dynamic"}, ["raft++", "dapo", "dynamic"]),
    ("raft", "configs/raft/testbed.yaml", {"policy_loss": "nll", "loss_type": "bnpo"}, ["raft"]),
    ("dpo", "configs/dpo/testbed.yaml", {"objective": "hdpo", "alpha": 0.9, "entanglement_steps": 5},
     ["hdpo", "entanglement"]),
    ("online_dpo", "configs/online_dpo/testbed.yaml", {"objective": "ipo"}, ["online_dpo", "ipo"]),
    ("xpo", "configs/xpo/testbed.yaml", {}, ["xpo", "dpo"]),
    ("egpo", "configs/egpo/testbed.yaml", {}, ["egpo", "online_ipo"]),
    ("iterative_dpo", "configs/iterative/testbed-ilr-dpo.yaml", {}, ["iterative_dpo", "lrdpo"]),
    ("iterative_dpo", "configs/iterative/testbed-apo.yaml", {}, ["apo", "dpo"]),
    ("sft", "configs/sft/testbed.yaml", {}, ["sft"]),
])
def test_methods_of_each_recipe(repo, tmp_path, recipe, config_file, overrides, expected):
    config = parse(get_recipe(recipe), ["--config", str(repo / config_file), f"output_dir={tmp_path / 'o'}",
                                        *(f"{k}={v}" for k, v in overrides.items())])
    assert methods_of(config) == expected


def test_base_model_follows_a_local_folder_to_its_hub_origin(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    carded, started, adapter, bare = (tmp_path / n for n in ("carded", "started", "adapter", "bare"))
    for folder in (snapshot, carded, started, adapter, bare):
        folder.mkdir(parents=True)
    (carded / "README.md").write_text("---\nbase_model: meta-llama/Llama-3.2-1B\nlicense: llama3.2\n---\n# x\n")
    (started / "align_config.yaml").write_text(f"model_name_or_path: {carded}\n")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(snapshot)}))
    assert base_model(str(snapshot)) == "Qwen/Qwen2.5-0.5B"
    assert base_model(str(carded)) == "meta-llama/Llama-3.2-1B"
    assert base_model(str(started)) == "meta-llama/Llama-3.2-1B"  # an align run's output: where that run started
    assert base_model(str(adapter)) == "Qwen/Qwen2.5-0.5B"
    assert base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base_model(str(bare)) is None and base_model("testbed:policy") is None


def test_header_of_an_adapter_of_a_cached_hub_model(tmp_path, testbed):
    from align.card import hub_metadata

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abcd"
    shutil.copytree(testbed.policy, snapshot)
    argv = ["--config", "testbed", f"output_dir={tmp_path / 'o'}", f"model_name_or_path={snapshot}", "use_peft=true"]
    config = parse(get_recipe("dpo"), argv)
    config.dataset_name = "trl-lib/ultrafeedback_binarized"  # a Hub dataset (offline, the config check refuses it)
    info = run_info("dpo", argv, config, {"rows": {"train": 10}}, 1.0)
    header = hub_metadata(config, info, ["dpo"], "me/smol-dpo", adapter=True)
    assert header == {"base_model": "HuggingFaceTB/SmolLM2-135M", "base_model_relation": "adapter",
                      "datasets": ["trl-lib/ultrafeedback_binarized"], "library_name": "peft", "license": "other",
                      "model_name": "smol-dpo", "pipeline_tag": "text-generation",
                      "tags": ["align", "generated_from_trainer", "dpo", "lora"]}
    merged = hub_metadata(config, info, ["dpo"], "me/smol-dpo", adapter=False)  # e.g. an iterative run's merge
    assert merged["base_model_relation"] == "finetune" and merged["library_name"] == "transformers"


# --- slow: real runs through align.recipe.main -----------------------------------------------------------------


def train(recipe: str, config_file, overrides: dict) -> int:
    return main(get_recipe(recipe), ["--config", str(config_file), *(f"{k}={v}" for k, v in overrides.items())])


def check_metrics_against_the_run(body: str, out) -> None:
    """The card's final-metrics table equals metrics.jsonl: each metric's last training log (and its step) and the
    final evaluation; its run totals equal the end-of-training summary."""
    records = read_jsonl(str(out / "metrics.jsonl"))
    summary = [r for r in records if "train_runtime" in r][-1]
    evaluation = [r for r in records if any(k.startswith("eval_") for k in r)][-1]
    train = [r for r in records if "train_runtime" not in r and not any(k.startswith("eval_") for k in r)]
    rows = metrics_rows(body)
    checked = 0
    for record in train:
        for key, value in record.items():
            if key not in ("step", "epoch") and record is [r for r in train if key in r][-1]:
                assert float(rows[key][0]) == pytest.approx(value, rel=1e-5, abs=1e-12), key
                assert int(rows[key][1]) == record["step"], key
                checked += 1
    for key, value in evaluation.items():
        if key.startswith("eval_"):
            assert float(rows[key[len("eval_"):]][2]) == pytest.approx(value, rel=1e-5, abs=1e-12), key
            checked += 1
    assert checked == sum(1 for r in rows.values() for v in (r[0], r[2]) if v)  # and nothing else in the table
    totals = dict(table(body, "### Run totals"))
    for key in ("train_loss", "train_runtime"):
        assert float(totals[key]) == pytest.approx(summary[key], rel=1e-5), key


def check_common(out, recipe: str, config_file, overrides: dict) -> tuple[dict, str]:
    header, body = read_card(out)
    changed = {row[0] for row in table(body, "### Hyper-parameters")}
    assert changed == changed_by_hand(recipe, config_file, overrides)
    check_metrics_against_the_run(body, out)
    cmd = command(body)
    assert cmd[:3] == ["align", "train", recipe]
    saved = yaml.safe_load((out / "align_config.yaml").read_text())
    reparsed = to_dict(parse(get_recipe(recipe), cmd[3:]))
    assert {k: v for k, v in reparsed.items() if k != "hub_token"} == \
        {k: v for k, v in saved.items() if k != "hub_token"}
    assert TOKEN not in (out / "README.md").read_text()
    assert [p.name for p in (out / "plots").glob("*.png")] and \
        all(f"](plots/{p.name})" in body for p in (out / "plots").glob("*.png"))
    return header, body


@pytest.mark.slow
def test_dpo_run_writes_a_true_card(repo, tmp_path, testbed):
    out = tmp_path / "dpo"
    config_file = repo / "configs/dpo/testbed.yaml"
    overrides = {"output_dir": out, "max_steps": 4, "logging_steps": 2, "max_train_samples": 64,
                 "max_eval_samples": 32, "beta": 0.25, "hub_token": TOKEN, "disable_tqdm": "true"}
    assert train("dpo", config_file, overrides) == 0
    header, body = check_common(out, "dpo", config_file, overrides)
    assert header["tags"] == ["align", "generated_from_trainer", "dpo"]
    assert header["library_name"] == "transformers" and "base_model" not in header and "datasets" not in header
    assert bibtex_keys(body) == ["rafailov2023direct", "vonwerra2020trl"]
    assert table(body, "### Data") == [["train", "testbed:preference", "train", "64"],
                                       ["eval", "testbed:preference", "test", "32"]]


@pytest.mark.slow
def test_grpo_gvm_run_writes_a_true_card(repo, tmp_path, testbed):
    out = tmp_path / "grpo"
    config_file = repo / "configs/grpo/testbed.yaml"
    overrides = {"output_dir": out, "allocator": "gvm", "max_steps": 2, "logging_steps": 1, "num_generations": 4,
                 "per_device_train_batch_size": 8, "max_train_samples": 64, "max_eval_samples": 8,
                 "eval_num_samples": 2, "hub_token": TOKEN, "disable_tqdm": "true"}
    assert train("grpo", config_file, overrides) == 0
    header, body = check_common(out, "grpo", config_file, overrides)
    assert header["tags"] == ["align", "generated_from_trainer", "grpo", "dapo", "gvm"]
    assert bibtex_keys(body) == ["shao2024deepseekmath", "yu2025dapo", "yao2025optimizing", "vonwerra2020trl"]
    assert "### GVM (gradient-variance-minimising sample allocation)" in body
    assert dict((r[0], r[1]) for r in table(body, "### Hyper-parameters"))["allocator"] == "gvm"
    assert int(dict(table(body, "### Run totals"))["rollouts/total"]) > 0


@pytest.mark.slow
def test_lora_dpo_run_card_names_the_base_and_its_snippet_runs(repo, tmp_path, testbed):
    start = tmp_path / "start"  # the testbed policy, with a card that names its Hub origin
    shutil.copytree(testbed.policy, start)
    (start / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M\nlicense: apache-2.0\n---\n")
    out = tmp_path / "lora"
    config_file = repo / "configs/dpo/testbed.yaml"
    overrides = {"output_dir": out, "model_name_or_path": start, "use_peft": "true", "lora_r": 4, "max_steps": 2,
                 "logging_steps": 1, "max_train_samples": 32, "max_eval_samples": 16, "hub_token": TOKEN,
                 "disable_tqdm": "true"}
    assert train("dpo", config_file, overrides) == 0
    header, body = check_common(out, "dpo", config_file, overrides)
    # the start folder is a fine-tune of that Hub model, so the adapter is not one of the Hub model itself
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M" and header["base_model_relation"] == "finetune"
    assert header["library_name"] == "peft" and header["license"] == "apache-2.0" and "lora" in header["tags"]
    assert (out / "adapter_config.json").is_file()
    snippet = re.search(r"## Quick start\n\n```python\n(.*?)```", body, re.S).group(1)
    assert "AutoPeftModelForCausalLM" in snippet and f'"{out}"' in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "quick-start", "exec"), {})  # the card's own snippet, run as a user would
    assert printed.getvalue().strip(), "the snippet generates text"
    assert os.path.isfile(out / "README.md")


@pytest.mark.slow
def test_two_process_run_writes_its_card_once_and_exits(repo, tmp_path, testbed):
    """Under accelerate launch the main process writes the card after the ranks left the process group (building the
    recipe's default config then must not set up a new group: that waited forever for the ranks that had exited)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "recipes/dpo.py", "--config",
           "configs/dpo/testbed.yaml", "max_steps=2", "logging_steps=1", "max_train_samples=32", "max_eval_samples=16",
           "per_device_train_batch_size=8", "disable_tqdm=true", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, body = read_card(out)
    assert "- Processes: 2 (CPU)" in body and "accelerate launch --num_processes 2 recipes/dpo.py" in body
    assert command(body)[3:] == cmd[cmd.index("--config"):]
    check_metrics_against_the_run(body, out)
