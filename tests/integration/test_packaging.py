"""Packaging: shipped configs by name (``--config testbed``), and a wheel installed in a fresh venv running the
quickstart and a recipe from an empty folder."""

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from align.errors import ConfigError
from align.shipped import configs_root, resolve_config, shipped_config, shipped_names


def test_configs_root_is_the_repositorys_configs_in_a_clone(repo):
    assert configs_root() == repo / "configs"
    assert shipped_config("dpo", "quickstart.yaml") == repo / "configs" / "dpo" / "quickstart.yaml"


def test_resolve_config_existing_file_is_used_as_is(repo, tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("max_steps: 1\n")
    assert resolve_config("dpo", str(own)) == str(own)
    monkeypatch.chdir(repo)
    assert resolve_config("dpo", "configs/dpo/testbed.yaml") == "configs/dpo/testbed.yaml"
    assert resolve_config("dpo", None) is None
    # a path that does not exist is left to the loader (which names the missing file)
    assert resolve_config("sft", "configs/sft/missing.yaml") == "configs/sft/missing.yaml"
    assert resolve_config("sft", "a/b/c") == "a/b/c"


def test_resolve_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped names work from any folder
    root = configs_root()
    assert resolve_config("dpo", "testbed") == str(root / "dpo" / "testbed.yaml")
    assert resolve_config("dpo", "quickstart") == str(root / "dpo" / "quickstart.yaml")
    assert resolve_config("dpo", "dpo/testbed") == str(root / "dpo" / "testbed.yaml")
    assert resolve_config("iterative_dpo", "testbed-apo") == str(root / "iterative" / "testbed-apo.yaml")
    assert resolve_config("iterative_dpo", "iterative/testbed-apo") == str(root / "iterative" / "testbed-apo.yaml")
    assert shipped_names("sft") == ["testbed"]
    assert shipped_names("no_such_recipe") == []


def test_resolve_config_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_config("sft", "nope")
    assert str(err.value) == "--config: no file or shipped config 'nope' for recipe 'sft' (shipped: testbed)"
    with pytest.raises(ConfigError, match=r"^--config: no file or shipped config 'dpo/nope' for recipe 'dpo' "
                                          r"\(shipped: quickstart, .*testbed\)$"):
        resolve_config("dpo", "dpo/nope")


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _build_wheel(repo: Path, tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and egg-info next to them)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("align", "rewards", "recipes", "configs"):
        shutil.copytree(repo / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(dist), str(src)], timeout=300)
    (wheel,) = dist.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_from_an_empty_folder(repo, tmp_path, testbed):
    wheel = _build_wheel(repo, tmp_path)
    assert wheel.name.startswith("align_trainer-")

    # contents: every align subpackage, rewards/recipes/configs inside align, nothing at the top level but align
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"align"}
    packages = {str(p.parent.relative_to(repo)) for p in (repo / "align").rglob("__init__.py")}
    assert {os.path.dirname(n) for n in names if n.endswith("/__init__.py")} >= packages
    assert "align/rewards/registry.py" in names and "align/recipes/dpo.py" in names
    shipped = {str(p.relative_to(repo)) for p in (repo / "configs").rglob("*.yaml")}
    assert {n.removeprefix("align/") for n in names if n.startswith("align/configs/")} == shipped
    assert "align/configs/accelerate/ddp.yaml" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert "align = align.cli:main" in metadata.decode()

    # a venv that sees the installed dependencies, with the wheel's align ahead of the editable checkout; its python
    # runs the system pip (a system site package), which installs into the venv: no pip of its own to bootstrap
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python, align = env_dir / "bin" / "python", env_dir / "bin" / "align"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["ALIGN_TESTBED_DIR"] = str(testbed.root)
    found = _run([python, "-c", "import align, align.shipped as s; print(align.__file__); print(s.configs_root())"],
                 cwd=empty, env=env, timeout=120).stdout.split()
    site = env_dir.resolve()
    assert Path(found[0]).resolve().is_relative_to(site), found
    assert Path(found[1]).resolve().is_relative_to(site), found

    recipes = _run([align, "recipes"], cwd=empty, env=env, timeout=300).stdout
    assert "  dpo " in recipes and "  iterative_dpo " in recipes

    # a recipe with a shipped config by name
    out = _run([align, "train", "dpo", "--config", "testbed", "max_steps=2", "logging_steps=1", "output_dir=dpo"],
               cwd=empty, env=env, timeout=600)
    assert "effective batch" in out.stdout
    records = [json.loads(line) for line in (empty / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (empty / "dpo" / "model.safetensors").is_file() and (empty / "dpo" / "align_config.yaml").is_file()
    bad = subprocess.run([align, "train", "sft", "--config", "nope"], capture_output=True, text=True, cwd=empty,
                         env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == \
        "error: --config: no file or shipped config 'nope' for recipe 'sft' (shipped: testbed)"

    # the quickstart, its outputs under the current folder
    out = _run([align, "quickstart", "--align-steps", "2", "--pair-prompts", "64"], cwd=empty, env=env, timeout=900)
    assert "pairs from 64 prompts" in out.stdout and "done in" in out.stdout
    qs = empty / "outputs" / "quickstart"
    summary = json.loads((qs / "summary.json").read_text())
    assert set(summary["held_out_accuracy"]) == {"random_init", "sft", "rpo"}
    assert "eval_rewards/accuracies" in summary["held_out_preferences"]
    stages = {json.loads(line)["stage"] for line in (qs / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "dpo"}
    assert (qs / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (qs / "pairs.jsonl").stat().st_size > 0 and (qs / "dpo" / "model.safetensors").is_file()
