"""Build script: the package list and the configs' package data (everything else is in pyproject.toml).

Every ``align.*`` subpackage is found automatically. ``align.rewards``, ``align.recipes`` and ``align.configs``
come from the repository's top-level ``rewards/``, ``recipes/`` and ``configs/`` folders (``package-dir`` in
pyproject.toml), so nothing installs under a generic top-level name; the YAML files of ``configs/`` and its
subfolders install as package data in ``align/configs/``.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PACKAGES = find_packages(where=str(ROOT), include=["align", "align.*"]) + ["align.rewards", "align.recipes"]
CONFIGS = ["align.configs"] + sorted(f"align.configs.{d.name}" for d in (ROOT / "configs").iterdir() if d.is_dir())

setup(
    packages=PACKAGES + CONFIGS,
    package_data={name: ["*.yaml"] for name in CONFIGS},
)
