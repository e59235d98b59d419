"""The config loader: YAML + overrides, types, and every bad input stopping before a model loads."""

import dataclasses
import json
import os

import pytest

from align.config import load_config, parse_overrides
from align.errors import ConfigError, DataError
from align.recipes.dpo import DPORecipeConfig
from align.recipes.sft import SFTRecipeConfig


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "model_name_or_path: testbed:policy\ndataset_name: testbed:sft\n"


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, BASE + f"output_dir: {tmp_path / 'o'}\nlearning_rate: 1.0e-3\nmax_steps: 5\n")
    cfg = load_config(SFTRecipeConfig, path, ["learning_rate=3e-4", "--max_steps", "7", "--bf16=false",
                                             "testbed_tasks=[add1,mul1]", "report_to=none", "use_peft=true"])
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 7 and cfg.bf16 is False and cfg.use_peft is True
    assert cfg.testbed_tasks == ["add1", "mul1"]
    # CPU-sane defaults, not TRL's
    assert cfg.gradient_checkpointing is False and cfg.report_to in ([], "none", ["none"])


def test_override_forms():
    assert parse_overrides(["a=1", "--b", "2", "--c=3", "--flag"]) == {"a": "1", "b": "2", "c": "3", "flag": "true"}
    assert parse_overrides(["--max-steps", "4"]) == {"max_steps": "4"}
    with pytest.raises(ConfigError, match="'oops' is not of the form key=value"):
        parse_overrides(["oops"])


def test_comma_list_and_none(tmp_path):
    cfg = load_config(SFTRecipeConfig, write(tmp_path, BASE), ["testbed_tasks=add1,sub1", "max_eval_samples=null",
                                                                f"output_dir={tmp_path}/o"])
    assert cfg.testbed_tasks == ["add1", "sub1"] and cfg.max_eval_samples is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learning_rat=1e-3"], "unknown config key 'learning_rat' in command line (did you mean 'learning_rate'?)"),
        (["learning_rate=fast"], "learning_rate: expected float, got 'fast' (from command line)"),
        (["max_steps=2.5"], "max_steps: expected int"),
        (["use_peft=maybe"], "use_peft: expected bool"),
        (["lr_scheduler_type=cosinee"], "lr_scheduler_type: expected"),
        (["fp16=true", "bf16=true"], "fp16 / bf16"),
        (["eval_strategy=steps"], "eval_strategy: evaluation is on but dataset_test_split is not set"),
        (["max_steps=0", "num_train_epochs=0"], "max_steps / num_train_epochs"),
        (["per_device_train_batch_size=0"], "per_device_train_batch_size: must be >= 1"),
        (["model_name_or_path=/nope/model"], "model_name_or_path: folder '/nope/model' does not exist"),
        (["model_name_or_path=testbed:large"], "unknown testbed model 'testbed:large'"),
        (["model_name_or_path=someorg/some-model"], "not in the Hub cache, and HF_HUB_OFFLINE is set"),
        (["dataset_name=./missing.jsonl"], "dataset_name: './missing.jsonl' does not exist"),
        (["dataset_name=testbed:pairs"], "dataset_name: unknown testbed dataset 'testbed:pairs'"),
        (["testbed_tasks=[add1,div9]"], "testbed_tasks: unknown task 'div9'"),
        (["torch_dtype=float8"], "torch_dtype: must be one of"),
        (["resume_from_checkpoint=true"], "resume_from_checkpoint: no checkpoint-* folder"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, no_model_loads, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SFTRecipeConfig, write(tmp_path, BASE), [f"output_dir={tmp_path}/out", *overrides])
    text = str(err.value)
    assert message in text and "\n" not in text


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, BASE + "lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate' in .*c.yaml"):
        load_config(SFTRecipeConfig, path)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTRecipeConfig, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SFTRecipeConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTRecipeConfig, write(tmp_path, "a: [1, 2\n"))


def test_existing_checkpoints_are_protected(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-10").mkdir(parents=True)
    for name in ("trainer_state.json", "model.safetensors"):  # complete: resumable (tests/integration/test_checkpoints)
        (out / "checkpoint-10" / name).write_text("{}")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        load_config(SFTRecipeConfig, write(tmp_path, BASE), [f"output_dir={out}"])
    cfg = load_config(SFTRecipeConfig, write(tmp_path, BASE), [f"output_dir={out}", "resume_from_checkpoint=true"])
    assert cfg.resume_from_checkpoint == str(out / "checkpoint-10")
    assert load_config(SFTRecipeConfig, write(tmp_path, BASE), [f"output_dir={out}", "overwrite_output_dir=true"])


def test_objective_hyperparameters_are_checked(tmp_path, no_model_loads):
    base = "model_name_or_path: testbed:policy\ndataset_name: testbed:preference\n"
    path = write(tmp_path, base + f"output_dir: {tmp_path}/o\n")
    cfg = load_config(DPORecipeConfig, path, ["objective=hdpo", "alpha=0.9"])
    assert cfg.objective_params() == {"beta": 0.1, "alpha": 0.9}
    with pytest.raises(ConfigError, match="alpha: objective 'dpo' does not take it"):
        load_config(DPORecipeConfig, path, ["objective=dpo", "alpha=0.9"])
    with pytest.raises(ConfigError, match="unknown objective 'dop'"):
        load_config(DPORecipeConfig, path, ["objective=dop"])
    with pytest.raises(ConfigError, match="objective 'dpo' does not take 'gamma'"):
        load_config(DPORecipeConfig, path, ["objective_kwargs={gamma: 1}"])
    with pytest.raises(ConfigError, match="ref_model_name_or_path: folder '/no/ref' does not exist"):
        load_config(DPORecipeConfig, path, ["ref_model_name_or_path=/no/ref"])


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "answer": "b"}], "train dataset: needs columns prompt+completion or messages or text"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "  ", "completion": "c"}],
         "train row 1, column 'prompt': is empty"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "q", "completion": ""}],
         "train row 1, column 'completion': is empty"),
        ([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}],
         "train row 1, column 'messages': has no messages"),
    ],
)
def test_bad_sft_rows_stop_before_the_model(tmp_path, no_model_loads, rows, message):
    from align.recipes.sft import run

    cfg = load_config(SFTRecipeConfig, overrides={"model_name_or_path": "testbed:policy",
                                                   "dataset_name": _jsonl(tmp_path, rows),
                                                   "output_dir": str(tmp_path / "o")})
    with pytest.raises(DataError) as err:
        run(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_every_shipped_config_names_only_known_keys(repo):
    """Real-model configs cannot be loaded here (no Hub), so check their keys against the recipe's config class:
    a typo in a shipped config would otherwise only surface on a user's GPU machine."""
    import dataclasses

    import yaml

    from align.recipe import discover

    recipes = discover()
    aliases = {"iterative": "iterative_dpo"}
    checked = 0
    for folder in sorted((repo / "configs").iterdir()):
        if folder.name == "accelerate":
            continue
        recipe = recipes[aliases.get(folder.name, folder.name)]
        fields = {f.name for f in dataclasses.fields(recipe.config_class)}
        for path in sorted(folder.glob("*.yaml")):
            unknown = set(yaml.safe_load(path.read_text())) - fields
            assert not unknown, f"{path}: unknown keys {sorted(unknown)}"
            checked += 1
    assert checked >= 18


def test_renamed_key_is_one_line_naming_the_new_name(repo, tmp_path):
    from align.recipes.iterative_dpo import IterativeRecipeConfig

    path = repo / "configs/iterative/testbed-apo.yaml"
    for old, new in (("max_new_tokens", "max_completion_length"), ("sample_temperature", "temperature")):
        with pytest.raises(ConfigError, match=f"^{old}: renamed to {new} ") as err:
            load_config(IterativeRecipeConfig, path, [f"output_dir={tmp_path}/o", f"{old}=1"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^max_new_tokens: renamed to max_completion_length \(in .*c.yaml\)"):
        load_config(IterativeRecipeConfig, write(tmp_path, path.read_text() + "max_new_tokens: 8\n"))


def test_generation_keys_have_one_name_and_each_recipe_keeps_its_defaults():
    from align.recipes.grpo import GRPORecipeConfig
    from align.recipes.iterative_dpo import IterativeRecipeConfig
    from align.recipes.online_dpo import OnlineRecipeConfig

    defaults = {cls.__name__: {f.name: f.default for f in dataclasses.fields(cls)}
                for cls in (GRPORecipeConfig, OnlineRecipeConfig, IterativeRecipeConfig)}
    assert [(d["max_prompt_length"], d["max_completion_length"], d["temperature"], d["generation_batch_size"])
            for d in defaults.values()] == [(512, 256, 1.0, 64), (512, 64, 1.0, 64), (256, 32, 1.0, 64)]
    assert all("max_new_tokens" not in d and "sample_temperature" not in d for d in defaults.values())


def test_help_groups_keys_by_part_wrapped_with_real_defaults():
    from align.config import config_help
    from align.recipes.grpo import GRPORecipeConfig

    text = config_help(GRPORecipeConfig, width=72)
    lines = text.splitlines()
    headings = [line[:-1] for line in lines if line and not line.startswith(" ")]
    assert headings == ["model", "data", "LoRA", "outputs", "prompt", "generation", "rollout", "RL", "trainer"]
    assert max(len(line) for line in lines) <= 72
    assert "reward_funcs (list[str], default ['accuracy'])" in text and "(factory)" not in text
    section = text[text.index("\ngeneration:"):text.index("\nrollout:")]
    assert "  max_completion_length (int, default 256)" in section  # a key sits in the part that defines it
    assert text.index("  learning_rate (float, default 1e-06)") > text.index("\ntrainer:")
