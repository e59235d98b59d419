"""The real-model configs run as written (issue 15 §4): each ``configs/<method>/<model>*.yaml`` names in its header the
accelerate config, GPU count and rollout engine it was sized for; it loads through align's own config parser with
every check on, as the processes of that launch would see it (the world size, the accelerate config's sharding in
the environment, a GPU); the GRPO / RAFT configs roll out with vLLM; docs/configs.md's table is this module's.

What this machine cannot reach is stood in for, and only that: the Hub (model and dataset ids are not looked up),
a GPU (transformers' bf16 check, align's ``has_accelerator``), vLLM when it is not installed, and a logger that is
not installed (``report_to: none``). No model or dataset is loaded."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from align.config import load_config
from align.recipe import discover
from align.rollout.args import RolloutArguments
from align.sizing import GIB, estimate, real_configs, render_table, sized_for

REPO = Path(__file__).resolve().parents[2]
CONFIGS = real_configs(REPO)
RECIPE_OF = {"iterative": "iterative_dpo"}
VLLM_KEYS = {f.name for f in fields(RolloutArguments)} - {"rollout"}


def test_every_real_config_is_found():
    assert len(CONFIGS) == 11
    assert {p.parent.name for p in CONFIGS} == {"dpo", "egpo", "grpo", "iterative", "online_dpo", "raft", "xpo"}


def launch_environment(accelerate_yaml: Path) -> dict[str, str]:
    """What ``accelerate launch --config_file accelerate_yaml`` puts in each process's environment that align's
    sharding checks read (the world size is given to the checks directly: with WORLD_SIZE set, transformers would
    start a process group)."""
    cfg = yaml.safe_load(accelerate_yaml.read_text())
    env = {}
    if cfg["distributed_type"] == "FSDP":
        env.update(ACCELERATE_USE_FSDP="true",
                   FSDP_CPU_RAM_EFFICIENT_LOADING=str(cfg["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]).lower())
    elif cfg["distributed_type"] == "DEEPSPEED":
        env.update(ACCELERATE_USE_DEEPSPEED="true",
                   ACCELERATE_DEEPSPEED_ZERO_STAGE=str(cfg["deepspeed_config"]["zero_stage"]))
    return env


@pytest.fixture
def gpu_machine_offline_hub(monkeypatch):
    import transformers.training_args

    import align.data.loading
    import align.modeling
    import align.rollout.vllm_engine
    import align.sharding

    monkeypatch.setattr(align.modeling, "check_model_path", lambda *a, **k: None)  # a Hub id: not looked up here
    monkeypatch.setattr(align.data.loading, "hub_offline", lambda: False)  # a dataset id: format checked, no fetch
    monkeypatch.setattr(align.sharding, "has_accelerator", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    if importlib.util.find_spec("vllm") is None:
        monkeypatch.setattr(align.rollout.vllm_engine, "require_vllm", lambda *a, **k: None)


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_real_config_header_and_parse_as_launched(path, tmp_path, monkeypatch, gpu_machine_offline_hub):
    text = path.read_text(encoding="utf-8")
    sized = sized_for(text)
    assert sized is not None, f"{path}: no '# Sized for: configs/accelerate/<file>.yaml on <N> GPUs of <G> GB; " \
                              "rollout: <engine>' line"
    accelerate_yaml = REPO / sized.accelerate
    assert accelerate_yaml.is_file(), sized.accelerate
    assert 1 <= sized.gpus <= 64 and sized.gpu_gb in (24, 40, 48, 80, 94, 141, 192)
    # the command the header gives uses the same launcher and count
    assert f"--accelerate_config {sized.accelerate} --num_processes {sized.gpus}" in text

    for key, value in launch_environment(accelerate_yaml).items():
        monkeypatch.setenv(key, value)
    import align.args

    monkeypatch.setattr(align.args, "world_size", lambda: sized.gpus)  # what every process of the launch reads
    recipe = discover()[RECIPE_OF.get(path.parent.name, path.parent.name)]
    raw = yaml.safe_load(text)
    overrides = [f"output_dir={tmp_path / 'out'}"]
    if raw.get("report_to") not in (None, "none", []):
        overrides.append("report_to=none")  # the logger's package is not a test dependency
    config = load_config(recipe.config_class, path, overrides)  # every part's check, on the header's world size

    engine = getattr(config, "rollout", "none")  # offline recipes generate nothing
    assert sized.rollout == engine
    if path.parent.name in ("grpo", "raft"):
        assert engine == "vllm"
        assert {"rollout", "vllm_gpu_memory_utilization", "vllm_sync_steps"} <= set(raw)  # said in the file
        assert config.vllm_tensor_parallel_size == 1  # one colocated engine per trainer process
    if engine in ("hf", "none"):
        assert not (set(raw) & VLLM_KEYS), "vLLM keys in a config that does not roll out with vLLM"

    # the estimate fits the GPU it was sized for, with 10% left for the CUDA context and the allocator
    assert estimate(path.parent.name, raw, sized)["total"] < 0.9 * sized.gpu_gb * 1e9 / GIB


def test_estimate_by_hand_for_gvm_grpo():
    """Qwen2.5-Math-1.5B (1.544e9 parameters) under ZeRO-2 on 8 GPUs: float32 weights 4P whole, gradients 4P / 8 and
    Adam 8P / 8; a float32 reference copy (beta 0.001) 4P; vLLM 0.3 x 80 GB."""
    path = REPO / "configs/grpo/qwen2.5-math-1.5b-numina-gvm.yaml"
    text = path.read_text()
    est = estimate("grpo", yaml.safe_load(text), sized_for(text))
    p = 1544e6
    assert est["weights"] == pytest.approx(4 * p / GIB)
    assert est["grads"] == pytest.approx(4 * p / 8 / GIB)
    assert est["adam"] == pytest.approx(8 * p / 8 / GIB)
    assert est["reference"] == pytest.approx(4 * p / GIB)
    assert est["rollout"] == pytest.approx(0.3 * 80e9 / GIB)
    # micro-batch 8 x (1024 + 3072) tokens, checkpointed: one layer's (6h + 4i) plus every layer's input, bf16
    t, h, i, layers = 8 * 4096, 1536, 8960, 28
    assert est["activations"] == pytest.approx(2 * t * (6 * h + 4 * i) / GIB + 2 * t * h * layers / GIB)
    assert est["logits"] == pytest.approx(12 * (2**25 // 151936) * 151936 / GIB)  # one auto block


def test_docs_table_is_the_estimate():
    docs = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    assert render_table(REPO) in docs, "docs/configs.md's table is stale: paste `python -m align.sizing`"
