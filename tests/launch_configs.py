"""The shipped accelerate configs as a user adapts them to one CPU machine, for the tests that launch them."""

import yaml


def cpu_variant(repo, tmp_path, name: str) -> str:
    """configs/accelerate/<name>.yaml as a user adapts it to one CPU machine: use_cpu, 2 processes, fp32; written to
    ``tmp_path/<name>-cpu.yaml``, whose path is returned."""
    cfg = yaml.safe_load((repo / "configs" / "accelerate" / f"{name}.yaml").read_text())
    cfg.update(use_cpu=True, num_processes=2, num_machines=1, machine_rank=0, mixed_precision="no")
    path = tmp_path / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
