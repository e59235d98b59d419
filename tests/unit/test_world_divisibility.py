"""A number of processes the batch does not fit (issue 15, Bad input), checked directly: the exact lines, and no
false alarm. Where align's batches are per process x processes by construction (preference steps, RL rounds, online
steps) nothing is refused; what is left: the epoch's last partial batch of offline preference training, which
accelerate pads with repeated rows on several processes, and a process count that does not split over the machines
of a multi-machine accelerate config. (Through the recipe, exit 2 and one line: tests/unit/test_bad_input_config.py,
cases ``*-processes``.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from align.checks import check_even_batches
from align.errors import ConfigError
from align.launch import check_machines, launcher_command


def config(per=8, accum=1, drop_last=False, max_steps=-1):
    return SimpleNamespace(per_device_train_batch_size=per, gradient_accumulation_steps=accum,
                           dataloader_drop_last=drop_last, max_steps=max_steps)


def test_last_batch_padded_on_several_processes_is_one_line():
    with pytest.raises(ConfigError) as err:
        check_even_batches(100, config(per=4), 8)
    assert str(err.value) == (
        "per_device_train_batch_size: 4 x processes 8 = 32 rows a batch does not divide the 100 train rows, so "
        "accelerate would fill the last batch with 28 rows repeated from the start (one process trains on the 4 "
        "left); set dataloader_drop_last: true, or max_train_samples: 96")


@pytest.mark.parametrize("rows, cfg, world", [
    (100, config(per=4), 1),  # one process: the last batch is simply shorter, as everywhere
    (96, config(per=4), 8),  # divides
    (100, config(per=4, drop_last=True), 8),  # the partial round is dropped on every process alike
    (100, config(per=4, max_steps=3), 8),  # 3 steps of 32 rows end before the partial batch
    (100, config(per=4, accum=3, max_steps=1), 8),  # 1 step of 3 x 32 = 96 rows: the same
])
def test_no_false_alarm(rows, cfg, world):
    check_even_batches(rows, cfg, world)


def test_max_steps_that_reach_the_partial_batch_still_refuse():
    with pytest.raises(ConfigError, match=r"^per_device_train_batch_size: 4 x processes 8 = 32 rows"):
        check_even_batches(100, config(per=4, max_steps=4), 8)  # the 4th step is the padded one


def test_processes_that_do_not_split_over_the_machines(repo, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    multi = "configs/accelerate/multi_node.yaml"
    with pytest.raises(ConfigError) as err:
        launcher_command("align.recipes.dpo", {"--accelerate_config": multi, "--num_processes": "15"}, [])
    assert str(err.value) == (
        "--num_processes: 15 processes do not split evenly over num_machines 2 (configs/accelerate/multi_node.yaml): "
        "accelerate would start 7 on each machine, 14 in all; give the processes of all machines together, a "
        "multiple of 2")
    cmd = launcher_command("align.recipes.dpo", {"--accelerate_config": multi, "--num_processes": "16"}, [])
    assert cmd[cmd.index("--num_processes") + 1] == "16"
    check_machines(multi, None)  # the shipped file: 16 processes over 2 machines
    launcher_command("align.recipes.dpo", {"--accelerate_config": "configs/accelerate/ddp.yaml",
                                           "--num_processes": "3"}, [])  # one machine: any count


def test_a_multi_machine_file_whose_own_count_does_not_split(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("distributed_type: MULTI_GPU\nnum_machines: 4\nnum_processes: 6\n")
    with pytest.raises(ConfigError, match=rf"^num_processes in {path}: 6 processes do not split evenly over "
                                          r"num_machines 4 .*would start 1 on each machine, 4 in all"):
        check_machines(str(path), None)
    check_machines(str(path), 8)  # the flag wins over the file


def test_machine_flags_pass_through_to_accelerate(repo, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    flags = {"--accelerate_config": "configs/accelerate/multi_node.yaml", "--machine_rank": "1",
             "--main_process_ip": "10.0.0.7", "--main_process_port": "29500"}
    cmd = launcher_command("align.recipes.dpo", flags, ["--config", "testbed"])
    assert cmd[3:] == ["--config_file", "configs/accelerate/multi_node.yaml", "--main_process_port", "29500",
                       "--machine_rank", "1", "--main_process_ip", "10.0.0.7", "-m", "align.recipes.dpo", "--config",
                       "testbed"]
    with pytest.raises(ConfigError, match=r"^--machine_rank: must be a whole number >= 0 \(0 on the machine at "
                                          r"--main_process_ip\), got '-1'$"):
        launcher_command("align.recipes.dpo", {**flags, "--machine_rank": "-1"}, [])
    with pytest.raises(ConfigError, match=r"^--main_process_ip: must be the host name or address of machine 0"):
        launcher_command("align.recipes.dpo", {**flags, "--main_process_ip": "a b"}, [])
