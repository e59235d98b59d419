"""scripts/gpu_check.sh (issue 15's GPU check) cannot run here on a GPU, so its figures are checked by hand and its
CPU path (``--cpu --tiny``: the same children of align's recipe path and TRL's trainers, a tiny model) runs end to
end, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_figures_and_ratios_by_hand():
    n = 1e9  # parameters
    results = {("trl", "single"): {"dpo": {"s_per_step": 2.0, "tokens": 1000.0, "generated": 0.0, "peak_mib": 4000.0},
                                   "grpo": {"s_per_step": 4.0, "tokens": 2000.0, "generated": 2000.0,
                                            "peak_mib": 8000.0}},
               ("align", "single"): {"dpo": {"s_per_step": 1.0, "tokens": 1000.0, "generated": 0.0, "peak_mib": 3000.0},
                                     "grpo": {"s_per_step": 5.0, "tokens": 2000.0, "generated": 2000.0,
                                              "peak_mib": 8000.0}},
               ("trl", "fsdp2"): {"dpo": {"failed": "exit 1: boom"}},
               ("align", "fsdp2"): {"dpo": {"refused": "distributed_type: no"}}}
    # DPO: 6 N FLOPs a trained token; 1000 tokens in 2 s on a 1000 TFLOP/s peak -> 3e12 / 1e15 = 0.3 %
    trl = gpu_check.figures(results[("trl", "single")]["dpo"], n, 1000.0)
    assert trl["tokens_per_s"] == 500.0 and trl["mfu"] == pytest.approx(6e12 / 2 / 1e15)
    # GRPO: + 2 N a sampled token: 8 N x 2000 / 5 s
    grpo = gpu_check.figures(results[("align", "single")]["grpo"], n, 1000.0)
    assert grpo["tokens_per_s"] == 400.0 and grpo["mfu"] == pytest.approx(8e9 * 2000 / 5 / 1e15)
    assert gpu_check.figures(results[("align", "single")]["grpo"], n, None)["mfu"] is None

    lines = gpu_check.report(results, n, 1000.0, ["dpo", "grpo"])
    dpo_align = next(x for x in lines if x.startswith("dpo    single  align"))
    assert dpo_align.split()[-2:] == ["2.00x", "0.75x"]  # tokens/s and peak memory, align / TRL
    assert next(x for x in lines if x.startswith("grpo   single  align")).split()[-2:] == ["0.80x", "1.00x"]
    assert "dpo    fsdp2   trl      FAILED: exit 1: boom" in lines
    assert "dpo    fsdp2   align    refused: distributed_type: no" in lines


def test_fsdp2_run_must_be_sharded_and_give_the_one_process_losses():
    one = {"losses": [0.6931, 0.61, 0.52], "sharded": False}
    results = {("align", "single"): {"dpo": one, "grpo": {"losses": [0.1, 0.2], "sharded": False}},
               ("align", "fsdp2"): {"dpo": {"losses": [0.6931, 0.615, 0.52], "sharded": True},
                                    "grpo": {"losses": [0.1, 0.2], "sharded": False}}}
    lines, ok = gpu_check.consistency(results, ["dpo", "grpo"])
    assert not ok  # GRPO's FSDP2 run was not sharded by align: a quiet fallback is a failure
    assert lines[0].endswith("max |diff| 0.005 (ok)") and "sharded by align yes" in lines[0]
    assert "sharded by align NO" in lines[1] and lines[1].endswith("(FAILED)")
    results[("align", "fsdp2")]["grpo"]["sharded"] = True
    assert gpu_check.consistency(results, ["dpo", "grpo"])[1]
    results[("align", "fsdp2")]["dpo"]["losses"][2] = 0.55  # 0.03 apart
    lines, ok = gpu_check.consistency(results, ["dpo", "grpo"])
    assert not ok and lines[0].endswith("max |diff| 0.03 (FAILED)")


def test_wheel_list_is_what_the_gpu_machine_lacks():
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert "WHEELS_PINNED=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)" in text
    from importlib.metadata import version

    # the pins are the versions this project is tested with
    assert [version(p) for p in ("trl", "datasets", "dill", "multiprocess")] == ["1.16.0", "5.2.0", "0.4.1", "0.70.19"]


@pytest.mark.slow
def test_cpu_path_runs_both_tools_on_the_same_work(tmp_path, testbed):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the wrapper puts the checkout first itself
    proc = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(r["tool"], r["method"]): r for r in report["results"]}
    assert set(runs) == {(t, m) for t in ("trl", "align", "align-pf") for m in ("dpo", "grpo")}
    assert all(r["launch"] == "single" and r["s_per_step"] > 0 and r["peak_mib"] > 0 for r in runs.values())
    # the same data and settings for both tools: the same tokens a step
    assert runs[("align", "dpo")]["tokens"] == runs[("trl", "dpo")]["tokens"] == runs[("align-pf", "dpo")]["tokens"] > 0
    s = gpu_check.SETTINGS["tiny"]
    assert runs[("align", "grpo")]["tokens"] == runs[("trl", "grpo")]["tokens"]
    assert runs[("align", "grpo")]["generated"] == runs[("align", "grpo")]["tokens"]
    assert runs[("align", "grpo")]["tokens"] > s["grpo_prompts"] * s["grpo_generations"] * s["grpo_tokens"]
    assert report["params"] < 1e6 and report["shape"] == "tiny"
    # the printed ratio is the JSON's
    line = next(x for x in proc.stdout.splitlines() if x.startswith("dpo    single  align "))
    ratio = (runs[("align", "dpo")]["tokens"] / runs[("align", "dpo")]["s_per_step"]) / (
        runs[("trl", "dpo")]["tokens"] / runs[("trl", "dpo")]["s_per_step"])
    assert line.split()[-2] == f"{ratio:.2f}x"
    assert "trl 1.16.0, datasets 5.2.0" in proc.stdout
