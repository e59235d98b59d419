"""Build (once) and cache the testbed: tokenizer, random tiny model, and its SFT warm-up.

Layout of the cache folder (``$ALIGN_TESTBED_DIR``, else ``~/.cache/align/testbed-v<SPEC>-<hash of the
testbed sources>``)::

    base/          tokenizer + randomly initialised tiny Llama (an ordinary HF folder)
    policy/        the same model after a short SFT warm-up (``recipes/sft.py``)
    testbed.json   spec version, parameter count, build time, held-out accuracy before/after

The folder is built under a temporary name and renamed into place, under a file lock, so parallel
test processes share one build and a killed build never leaves a half-written testbed behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SPEC_VERSION = 1
# The warm-up: configs/sft/testbed.yaml holds the same settings for users (a test keeps them equal).
WARMUP = dict(
    dataset_name="testbed:sft",
    testbed_tasks=["add1", "sub1", "mul1"],
    max_train_samples=8192,
    max_steps=300,
    per_device_train_batch_size=64,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=20,
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


def spec_hash() -> str:
    """A digest of everything that shapes the testbed, so a changed spec never reuses a stale cache."""
    import hashlib

    here = Path(__file__).parent
    digest = hashlib.sha1(json.dumps(WARMUP, sort_keys=True).encode())
    for name in ("tasks.py", "tokenizer.py", "model.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:10]


def default_dir() -> Path:
    env = os.environ.get("ALIGN_TESTBED_DIR")
    return Path(env) if env else Path.home() / ".cache" / "align" / f"testbed-v{SPEC_VERSION}-{spec_hash()}"


def ensure_testbed(root: str | os.PathLike | None = None, force: bool = False, progress: bool = True) -> Testbed:
    """The cached testbed, building it first if it is missing (or ``force``)."""
    from filelock import FileLock

    root = Path(root) if root else default_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "testbed.json").is_file() and not force:
            return Testbed(root)
        tmp = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = _build(tmp, progress)
            (tmp / "testbed.json").write_text(json.dumps(info, indent=2))
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Testbed(root)


def held_out_accuracy(model, tokenizer, tasks=None, progress: bool = False) -> dict:
    """Greedy accuracy on every held-out problem of ``tasks`` (default: the warm-up tasks)."""
    from align.evaluation import accuracy
    from align.testbed.tasks import rl_rows

    rows = rl_rows(tuple(tasks or WARMUP["testbed_tasks"]), n=None, split="test")
    return accuracy(model, tokenizer, rows, progress=progress)


def _build(tmp: Path, progress: bool) -> dict:
    from align.config import load_config
    from align.modeling import load_model, load_tokenizer
    from align.testbed.model import build_model
    from align.testbed.tokenizer import train_tokenizer
    from recipes.sft import SFTRecipeConfig, run

    t0 = time.perf_counter()
    tokenizer = train_tokenizer()
    model = build_model(tokenizer, seed=0)
    tokenizer.save_pretrained(tmp / "base")
    model.save_pretrained(tmp / "base")
    n_params = sum(p.numel() for p in model.parameters())
    before = held_out_accuracy(model, tokenizer, progress=progress)

    config = load_config(
        SFTRecipeConfig,
        overrides={**WARMUP, "model_name_or_path": str(tmp / "base"), "output_dir": str(tmp / "policy"),
                   "disable_tqdm": not progress},
    )
    run(config)
    for junk in ("align_config.yaml", "training_args.bin"):
        (tmp / "policy" / junk).unlink(missing_ok=True)
    policy = load_model(str(tmp / "policy"))
    after = held_out_accuracy(policy, load_tokenizer(str(tmp / "policy")), progress=progress)
    return {
        "spec_version": SPEC_VERSION,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "warmup": WARMUP,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "held_out_accuracy": {"base": before, "policy": after},
    }
