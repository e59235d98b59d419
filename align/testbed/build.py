"""Build (once) and cache the testbed: tokenizer, random tiny model, and its SFT warm-up.

Two specs are built here: spec 2 (the default: single-digit fact tables, :mod:`align.testbed.tasks`) and spec 3
(multi-digit arithmetic with a worked scratchpad, :mod:`align.testbed.arith` and :mod:`align.testbed.spec3`).
Layout of the cache folder (``$ALIGN_TESTBED_DIR``, else ``~/.cache/align/testbed-v<SPEC>-<hash of the
testbed sources>``; spec 3 reads ``$ALIGN_TESTBED_V3_DIR``)::

    base/          tokenizer + randomly initialised tiny Llama (an ordinary HF folder)
    policy/        the same model after a short SFT warm-up (:func:`align.trainers.sft.train_sft`)
    testbed.json   spec version, parameter count, build time, held-out accuracy before/after

The folder is built under a fresh temporary name beside it and renamed into place, under a file lock, so parallel
test processes share one build and a killed build never leaves a half-written testbed behind. Only a testbed (or an
empty folder) is ever replaced: a ``--dir`` / ``$ALIGN_TESTBED_DIR`` that holds anything else is refused.

The build runs in a child process with pinned numerics (:data:`BUILD_ENV`: one thread, AVX2 kernels in ATen,
oneDNN and MKL, no GPU). The warm-up is sensitive to rounding: left to the machine, the thread count and the CPU's
vector width alone moved its held-out accuracy between 45% and 59% on one machine (between 13% and 22% with
the earlier learning rate 3e-3, which overshoots). Pinned, every x86-64 machine with AVX2 builds the same
testbed (other CPUs build a similar one, not the same one).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from align.errors import ConfigError

SPEC_VERSION = 2  # the default spec
SPECS = (2, 3)
# Pinned numerics of the build (see the module docstring); part of the spec hash.
BUILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "CUDA_VISIBLE_DEVICES": "",
}
# The warm-up: configs/sft/testbed.yaml holds the same settings for users (a test keeps them equal).
WARMUP = dict(
    dataset_name="testbed:sft",
    testbed_tasks=["add1", "sub1", "mul1"],
    max_train_samples=8192,
    max_steps=150,
    per_device_train_batch_size=64,
    learning_rate=1.5e-3,
    lr_scheduler_type="cosine",
    warmup_steps=10,
    weight_decay=0.0,
    logging_steps=10,
    save_strategy="no",
    max_length=64,
    seed=0,
)


@dataclass(frozen=True)
class Testbed:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def info(self) -> dict:
        return json.loads((self.root / "testbed.json").read_text())


def check_spec(spec: int) -> None:
    if spec not in SPECS:
        raise ConfigError(f"testbed spec {spec!r}: unknown (known: {', '.join(map(str, SPECS))})")


def warmup(spec: int = SPEC_VERSION) -> dict:
    """The SFT warm-up settings of testbed ``spec``."""
    if spec == 3:
        from align.testbed.spec3 import WARMUP as WARMUP3

        return WARMUP3
    return WARMUP


def spec_hash(spec: int = SPEC_VERSION) -> str:
    """A digest of everything that shapes the testbed, so a changed spec never reuses a stale cache."""
    import hashlib

    check_spec(spec)
    here = Path(__file__).parent
    digest = hashlib.sha1(json.dumps([warmup(spec), BUILD_ENV], sort_keys=True).encode())
    sources = ("tasks.py", "tokenizer.py", "model.py") + (("arith.py", "spec3.py") if spec == 3 else ())
    for name in sources:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:10]


def default_dir(spec: int = SPEC_VERSION) -> Path:
    env = os.environ.get("ALIGN_TESTBED_DIR" if spec == SPEC_VERSION else f"ALIGN_TESTBED_V{spec}_DIR")
    return Path(env) if env else Path.home() / ".cache" / "align" / f"testbed-v{spec}-{spec_hash(spec)}"


def ensure_testbed(root: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                   spec: int = SPEC_VERSION) -> Testbed:
    """The cached testbed of ``spec``, building it first if it is missing (or ``force``). The build goes into a
    fresh sibling folder that then takes ``root``'s place; a ``root`` that holds anything but a testbed is refused
    (ConfigError), never deleted."""
    from filelock import FileLock

    check_spec(spec)
    root = Path(os.path.abspath(root or default_dir(spec)))  # "--dir ." has a name and a parent
    if root.parent == root:
        raise ConfigError(f"testbed folder {str(root)!r}: a filesystem root cannot hold the testbed; name a folder")
    check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "testbed.json").is_file() and not force:
            return Testbed(root)
        check_replaceable(root)
        for name in os.listdir(root.parent):  # our leftovers of killed builds
            if name.startswith(f".{root.name}.building-"):
                shutil.rmtree(root.parent / name, ignore_errors=True)
        tmp = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        old = tmp.with_name(tmp.name + ".old")
        try:
            _build_in_child(tmp, progress, spec)
            check_replaceable(root)  # still a testbed, empty or absent after the build
            if root.exists() and not is_testbed(root):
                root.rmdir()  # empty (rmdir refuses anything else): nothing to lose
            elif root.exists():
                os.replace(root, old)  # the previous testbed, removed once the new one is in place
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return Testbed(root)


def is_testbed(root: Path) -> bool:
    """Whether folder ``root`` holds a testbed built here (a ``testbed.json`` that names its spec version)."""
    try:
        info = json.loads((root / "testbed.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "spec_version" in info


def check_replaceable(root: Path) -> None:
    """ConfigError unless ``root`` is absent, an empty folder or a testbed: a build never replaces anything else."""
    if not root.exists() or is_testbed(root) or (root.is_dir() and not any(root.iterdir())):
        return
    what = "a folder" if root.is_dir() else "a file"
    raise ConfigError(f"testbed folder {str(root)!r} (--dir / ALIGN_TESTBED_DIR) is {what} that holds no testbed; "
                      "it is left untouched: name a new or empty folder")


def held_out_accuracy(model, tokenizer, tasks=None, progress: bool = False, spec: int = SPEC_VERSION) -> dict:
    """Greedy accuracy on the held-out problems of ``tasks`` (default: the warm-up tasks): spec 2, every one;
    spec 3, the first :data:`align.testbed.spec3.EVAL_PER_TASK` of each task's pool."""
    from align.evaluation import accuracy

    tasks = tuple(tasks or warmup(spec)["testbed_tasks"])
    if spec == 3:
        from align.testbed.arith import rl_rows as rows3
        from align.testbed.spec3 import EVAL_PER_TASK, MAX_NEW_TOKENS

        rows = rows3(tasks, n=EVAL_PER_TASK * len(tasks), split="test")
        return accuracy(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS, progress=progress)
    from align.testbed.tasks import rl_rows

    rows = rl_rows(tasks, n=None, split="test")
    return accuracy(model, tokenizer, rows, progress=progress)


def _build_in_child(tmp: Path, progress: bool, spec: int = SPEC_VERSION) -> None:
    """Run :func:`build` in a fresh interpreter under :data:`BUILD_ENV` (the env must be set before torch loads)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **BUILD_ENV, "PYTHONPATH": path}
    code = ("import sys, pathlib, align.testbed.build as b; "
            "b.build(pathlib.Path(sys.argv[1]), sys.argv[2] == '1', int(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp), "1" if progress else "0", str(spec)], env=env)
    if proc.returncode != 0 or not (tmp / "testbed.json").is_file():
        raise RuntimeError(f"testbed build failed (exit status {proc.returncode}); its output is above")


def build(tmp: Path, progress: bool, spec: int = SPEC_VERSION) -> None:
    """Build the testbed of ``spec`` into folder ``tmp`` in this process (run it under :data:`BUILD_ENV`, as
    :func:`ensure_testbed` does)."""
    from align.config import load_config
    from align.modeling import load_model, load_tokenizer
    from align.recipe import start
    from align.trainers.sft import SFTArguments, train_sft

    if spec == 3:
        from align.testbed.spec3 import build_model, train_tokenizer
    else:
        from align.testbed.model import build_model
        from align.testbed.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tokenizer = train_tokenizer()
    model = build_model(tokenizer, seed=0)
    tokenizer.save_pretrained(tmp / "base")
    model.save_pretrained(tmp / "base")
    n_params = sum(p.numel() for p in model.parameters())
    before = held_out_accuracy(model, tokenizer, progress=progress, spec=spec)

    config = load_config(
        SFTArguments,
        overrides={**warmup(spec), "model_name_or_path": str(tmp / "base"), "output_dir": str(tmp / "policy"),
                   "disable_tqdm": not progress},
    )
    train_sft(config, callbacks=lambda: start(config))
    for junk in ("align_config.yaml", "training_args.bin"):
        (tmp / "policy" / junk).unlink(missing_ok=True)
    policy = load_model(str(tmp / "policy"))
    after = held_out_accuracy(policy, load_tokenizer(str(tmp / "policy")), progress=progress, spec=spec)
    info = {
        "spec_version": spec,
        "build_env": BUILD_ENV,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "warmup": warmup(spec),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "held_out_accuracy": {"base": before, "policy": after},
    }
    (tmp / "testbed.json").write_text(json.dumps(info, indent=2))
