"""The configs shipped with align: where they are (a clone or an installed wheel) and ``--config`` by name.

In the repository the configs live in ``configs/`` next to the ``align`` package; a wheel installs the same
files as package data in ``align/configs/``. ``resolve_config`` lets ``--config`` name a shipped config
(``testbed``, ``dpo/testbed``) so a recipe runs from any folder.
"""

from __future__ import annotations

from pathlib import Path

from align.errors import ConfigError

# Recipes whose shipped configs sit in a folder not named after the recipe.
CONFIG_FOLDERS = {"iterative_dpo": "iterative"}
SUFFIXES = (".yaml", ".yml")


def configs_root() -> Path:
    """The folder of shipped configs: ``align/configs`` in a wheel, the repository's ``configs/`` in a clone."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    if installed.is_dir():
        return installed
    clone = package.parent / "configs"
    if clone.is_dir() and (package.parent / "pyproject.toml").is_file():
        return clone
    raise ConfigError(f"no shipped configs next to {package} (reinstall align)")


def config_folder(recipe: str) -> str:
    """The folder under the configs root that holds ``recipe``'s configs."""
    return CONFIG_FOLDERS.get(recipe, recipe)


def shipped_names(recipe: str) -> list[str]:
    """The names of ``recipe``'s shipped configs (file names without ``.yaml``), sorted."""
    folder = configs_root() / config_folder(recipe)
    return sorted(p.stem for p in folder.glob("*") if p.suffix in SUFFIXES) if folder.is_dir() else []


def shipped_config(*parts: str) -> Path:
    """A file under the shipped configs (e.g. ``shipped_config("dpo", "quickstart.yaml")``); ConfigError if absent."""
    path = configs_root().joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"shipped config {'/'.join(('configs',) + parts)} is missing (reinstall align)")
    return path


def resolve_config(recipe: str, value: str | None) -> str | None:
    """``--config`` of ``align train <recipe>``: an existing file is used as is; a name without a ``.yaml``
    suffix (``testbed``) or ``<folder>/<name>`` (``dpo/testbed``) is a shipped config; anything else is returned
    unchanged (loading it then reports the missing file). An unknown name raises ConfigError listing the
    recipe's shipped configs."""
    if value is None or Path(value).is_file() or Path(value).suffix in SUFFIXES:
        return value
    parts = value.strip("/").split("/")
    if len(parts) > 2 or any(part in ("", ".", "..") for part in parts):
        return value
    folder, name = (config_folder(recipe), parts[0]) if len(parts) == 1 else parts
    for suffix in SUFFIXES:
        path = configs_root() / folder / f"{name}{suffix}"
        if path.is_file():
            return str(path)
    names = ", ".join(shipped_names(recipe)) or "none"
    raise ConfigError(f"--config: no file or shipped config {value!r} for recipe {recipe!r} "
                      f"(shipped: {names})")
