"""Every shipped accelerate config x every recipe (issue 15): adapted to two CPU processes, each either trains with
the 1-process numbers (same global batch) or is refused in one line; never exit 0 on different numbers.

:data:`COVERED` names the test that runs a cell elsewhere (with more steps and more checks); the cells no other test
runs are run here, one or two optimizer steps each, against one process. ``ddp.yaml`` adapted to the CPU is
``cpu2.yaml``, and ``multi_node.yaml`` is ``fsdp2.yaml`` but for how the machines meet (asserted below;
test_multi_node.py launches two real "machines"). ``test_every_cell_is_run_somewhere`` keeps the table complete: a
new config or recipe without a test fails it. Each run says which sharding it really ran (DeepSpeed's engine and
stage, align's FSDP2, or the DDP fallback warning for TRL's SFTTrainer under FSDP on the CPU)."""

import re
from pathlib import Path

import pytest
import yaml
from launch_configs import cpu_variant
from test_fsdp2 import launch as launch_recipe

from align.sharding import FSDP2_NOTE, cpu_fallback_warning

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if p.stem != "__init__")
CONFIGS = sorted(p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml"))
SAME = {"ddp": "cpu2", "multi_node": "fsdp2"}  # identical once adapted to one CPU machine (asserted below)

D = "tests/distributed/"
COVERED = {
    ("cpu2", "dpo"): D + "test_distributed.py::test_two_processes_match_one",
    ("cpu2", "grpo"): D + "test_distributed_rl.py::test_two_processes_match_one",
    ("cpu2", "egpo"): D + "test_distributed_online.py::test_egpo_two_processes_match_one",
    ("cpu2", "iterative_dpo"): "tests/integration/test_iterative.py::test_two_processes_make_the_same_pairs_as_one",
    ("zero2", "dpo"): D + "test_sharded_configs.py::test_dpo_under_zero2_on_one_cpu_machine",
    ("zero2", "egpo"): D + "test_fsdp2.py::test_egpo_under_deepspeed_matches_one_process",
    ("zero3", "dpo"): D + "test_fsdp2.py::test_dpo_live_reference_matches_one_process",
    ("zero3", "grpo"): D + "test_fsdp2.py::test_grpo_gvm_under_zero3_matches_one_process",
    ("zero3", "online_dpo"): D + "test_fsdp2.py::test_online_dpo_under_zero3_matches_one_process",
    ("zero3", "egpo"): D + "test_fsdp2.py::test_egpo_under_deepspeed_matches_one_process",
    ("zero3", "iterative_dpo"): D + "test_sharded_configs.py::test_iterative_driver_under_fsdp2_and_zero3_on_the_cpu",
    ("fsdp2", "dpo"): D + "test_fsdp2.py::test_dpo_under_fsdp2_matches_one_process",
    ("fsdp2", "grpo"): D + "test_fsdp2.py::test_grpo_gvm_under_fsdp2_matches_one_process",
    ("fsdp2", "raft"): D + "test_fsdp2.py::test_frozen_reference_copy_under_fsdp2",
    ("fsdp2", "online_dpo"): D + "test_fsdp2.py::test_online_trainers_under_fsdp2_match_one_process",
    ("fsdp2", "xpo"): D + "test_sharded_configs.py::test_online_trainers_under_fsdp2_on_the_cpu",
    ("fsdp2", "egpo"): D + "test_fsdp2.py::test_online_trainers_under_fsdp2_match_one_process",
    ("fsdp2", "iterative_dpo"): D + "test_sharded_configs.py::test_iterative_driver_under_fsdp2_and_zero3_on_the_cpu",
}
RUN_HERE = [(c, r) for c in CONFIGS if c not in SAME for r in RECIPES if (c, r) not in COVERED]

COMMON = ["logging_steps=1", "save_strategy=no", "dataset_test_split=null", "disable_tqdm=true",
          "overwrite_output_dir=true"]
RL = ["max_steps=1", "num_generations=4", "num_minibatches=1", "micro_batch_size=16", "max_train_samples=32"]
ONLINE = ["max_steps=1", "max_train_samples=32"]
# recipe: (its arguments, per-process batch of the 1-process run; the 2-process runs take half)
SETTINGS = {
    "sft": (["--config", "configs/sft/testbed.yaml", "max_steps=2", "max_train_samples=64", "warmup_steps=0"], 16),
    "dpo": (["--config", "configs/dpo/testbed.yaml", "max_steps=2", "max_train_samples=32"], 8),
    "grpo": (["--config", "configs/grpo/testbed.yaml", *RL, "allocator=gvm"], 4),
    "raft": (["--config", "configs/raft/testbed.yaml", *RL], 4),
    "online_dpo": (["--config", "configs/online_dpo/testbed.yaml", *ONLINE], 8),
    "xpo": (["--config", "configs/xpo/testbed.yaml", *ONLINE], 8),
    "egpo": (["--config", "configs/egpo/testbed.yaml", "max_steps=2", "max_train_samples=32", "mixture_coef=0.5"], 8),
    "iterative_dpo": (["--config", "configs/iterative/testbed-ilr-dpo.yaml", "iterations=2", "max_train_samples=16",
                       "samples_per_prompt=2", "max_steps=1", "eval_num_samples=0", "dataloader_drop_last=true"], 8),
}
KEYS = ("loss", "grad_norm", "reward", "rewards/chosen", "logps/chosen", "logps/rejected")


def launch(tmp: Path, recipe: str, config: str | None):
    """``recipe`` with its :data:`SETTINGS` on 1 process (``config`` None) or on 2 under ``config`` adapted to the CPU
    (half the per-process batch): the process and the records that carry a loss."""
    args, per_device = SETTINGS[recipe]
    launch_config = None if config is None else cpu_variant(REPO, tmp, config)
    per_device = per_device if config is None else per_device // 2
    return launch_recipe(REPO, tmp / (config or "one"), recipe,
                         [*args, *COMMON, f"per_device_train_batch_size={per_device}"], launch_config)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run of each recipe, made once per test worker when a cell first needs it."""
    done = {}

    def get(recipe):
        if recipe not in done:
            done[recipe] = launch(tmp_path_factory.mktemp(f"one-{recipe}"), recipe, None)[1]
        return done[recipe]
    return get


def assert_in_effect(proc, config: str, recipe: str) -> None:
    """The sharding the run really had: DeepSpeed's engine at the config's stage in each process, align's FSDP2, the
    DDP fallback warning for SFT under FSDP on the CPU, or plain DDP (no sharding line, no warning)."""
    if config.startswith("zero"):
        for r in (0, 1):
            assert f"DeepSpeed ZeRO-{config[-1]} (process {r} of 2): DeepSpeedEngine" in proc.stdout
    elif config == "fsdp2" and recipe == "sft":
        assert proc.stderr.count(cpu_fallback_warning("FSDP")) == 1
    elif config == "fsdp2":
        assert proc.stderr.count(FSDP2_NOTE) == 1
    else:
        assert "DeepSpeed ZeRO" not in proc.stdout and "warning: distributed_type" not in proc.stderr


def test_every_cell_is_run_somewhere():
    """Every config x recipe is run here, or by the test :data:`COVERED` names (which exists), or is the same file
    as a config that is; every test named exists."""
    assert len(RECIPES) == 8 and set(SETTINGS) == set(RECIPES)
    assert set(SAME) | set(SAME.values()) <= set(CONFIGS)
    for (config, recipe), test in COVERED.items():
        assert config in CONFIGS and recipe in RECIPES, (config, recipe)
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), test
    assert len(RUN_HERE) + len(COVERED) == len(RECIPES) * (len(CONFIGS) - len(SAME))


@pytest.mark.parametrize("config, like", sorted(SAME.items()))
def test_configs_that_adapt_to_the_same_cpu_run(tmp_path, config, like):
    """``ddp.yaml`` on one CPU machine is ``cpu2.yaml``; ``multi_node.yaml`` is ``fsdp2.yaml`` but for the keys that say
    how machines meet (the two-machine launch itself: test_multi_node.py)."""
    a, b = (yaml.safe_load(Path(cpu_variant(REPO, tmp_path, name)).read_text()) for name in (config, like))
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ <= {"same_network", "rdzv_backend", "main_process_port"}, differ


@pytest.mark.slow
@pytest.mark.parametrize("config, recipe", [  # one worker per recipe: its 1-process run is made once
    pytest.param(c, r, id=f"{c}-{r}", marks=pytest.mark.xdist_group(f"matrix-{r}")) for c, r in RUN_HERE])
def test_cell_gives_one_process_numbers(tmp_path, testbed, one_process, config, recipe):
    one = one_process(recipe)
    proc, two = launch(tmp_path, recipe, config)
    assert_in_effect(proc, config, recipe)
    assert len(two) == len(one) >= 1
    compared = 0
    for key in KEYS:
        first, second = [r.get(key) for r in one], [r.get(key) for r in two]
        assert [x is None for x in second] == [x is None for x in first], key
        if first[0] is not None:
            assert [x for x in second if x is not None] == pytest.approx([x for x in first if x is not None],
                                                                         rel=1e-5, abs=1e-5), key
            compared += 1
    assert compared >= 2  # at least the loss and the gradient norm
