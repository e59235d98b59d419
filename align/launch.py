"""``align train <recipe> --accelerate_config FILE [--num_processes N] [--main_process_port P] [--machine_rank R
--main_process_ip HOST] ...``: the same run under ``accelerate launch``, so nobody needs to call ``recipes/<name>.py``
by path (on several machines: the same command on each, with its ``--machine_rank``).

The launcher flags are taken out of the command line (anywhere after the recipe's name) and the command re-executes
itself as ``python -m accelerate.commands.launch --config_file FILE [--num_processes N] [--main_process_port P]
-m align.recipes.<recipe> <the rest>``: every process then runs the recipe module, exactly as
``accelerate launch recipes/<recipe>.py`` does. Bad flags are one-line ConfigErrors before anything starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from align.errors import ConfigError

FLAGS = ("--accelerate_config", "--num_processes", "--main_process_port", "--machine_rank", "--main_process_ip")


def split_launcher_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``({flag: value}, the other arguments)``: each of :data:`FLAGS` as ``--flag VALUE`` or ``--flag=VALUE``
    (hyphens or underscores), taken out of ``argv``."""
    flags, rest = {}, []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        name, eq, value = arg.partition("=")
        key = "--" + name[2:].replace("-", "_") if name.startswith("--") else name
        if key not in FLAGS:
            rest.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"{key}: needs a value ({key} VALUE)")
            value = items[i + 1]
            i += 1
        flags[key] = value
        i += 1
    return flags, rest


def launcher_command(module: str, flags: dict[str, str], rest: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command that runs recipe module ``module`` with ``rest``; checks the flags."""
    config = flags.get("--accelerate_config")
    if config is None:
        extra = ", ".join(k for k in flags)
        raise ConfigError(f"{extra}: needs --accelerate_config FILE (an accelerate config, e.g. "
                          "configs/accelerate/ddp.yaml)")
    if not os.path.isfile(config):
        raise ConfigError(f"--accelerate_config: file {config!r} does not exist (shipped ones: configs/accelerate/"
                          "ddp.yaml, fsdp2.yaml, zero1.yaml, zero2.yaml, zero3.yaml, multi_node.yaml, cpu2.yaml)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    for key, low in (("--num_processes", 1), ("--main_process_port", 1), ("--machine_rank", 0)):
        if key not in flags:
            continue
        value = flags[key]
        if not value.isdigit() or int(value) < low or (key == "--main_process_port" and int(value) > 65535):
            what = {"--num_processes": "a whole number >= 1", "--machine_rank": "a whole number >= 0 (0 on the "
                    "machine at --main_process_ip)"}.get(key, "a port number in 1..65535")
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
        cmd += [key, value]
    if "--main_process_ip" in flags:
        ip = flags["--main_process_ip"]
        if not ip or any(c.isspace() for c in ip):
            raise ConfigError(f"--main_process_ip: must be the host name or address of machine 0, got {ip!r}")
        cmd += ["--main_process_ip", ip]
    check_machines(config, int(flags["--num_processes"]) if "--num_processes" in flags else None)
    if os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK"):
        raise ConfigError("--accelerate_config: this command already runs under a launcher (WORLD_SIZE is set); "
                          "leave out --accelerate_config / --num_processes, or run align train without the launcher")
    return [*cmd, "-m", module, *rest]


def check_machines(config: str, num_processes: int | None) -> None:
    """``num_processes`` (the flag's, else the accelerate config's) is a whole number of processes on each of the
    config's ``num_machines``: accelerate starts ``num_processes // num_machines`` on each machine, so a remainder
    would silently shrink the run (and the global batch) the user sized."""
    import yaml

    try:
        with open(config, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return  # accelerate reports an unreadable config itself
    if not isinstance(cfg, dict):
        return
    machines = cfg.get("num_machines") or 1
    n = num_processes if num_processes is not None else cfg.get("num_processes")
    if not isinstance(machines, int) or not isinstance(n, int) or machines <= 1 or n % machines == 0:
        return
    key = "--num_processes" if num_processes is not None else f"num_processes in {config}"
    raise ConfigError(f"{key}: {n} processes do not split evenly over num_machines {machines} ({config}): accelerate "
                      f"would start {n // machines} on each machine, {n // machines * machines} in all; give the "
                      f"processes of all machines together, a multiple of {machines}")


def relaunch(module: str, flags: dict[str, str], rest: Sequence[str]) -> None:
    """Replace this process by ``accelerate launch`` running the recipe (same process id, so a SIGTERM / SIGINT
    reaches the launcher, which passes it on to every rank: align.stopping's clean stop)."""
    cmd = launcher_command(module, flags, rest)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
