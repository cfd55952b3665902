"""Reading a recipe or another tool's config file: YAML, ``--set`` overrides, dialect
translation (:mod:`plugtune.config.dialects`), validation (:mod:`plugtune.config.schema`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from plugtune.config.dialects import translate
from plugtune.config.schema import (
    Recipe,
    RecipeError,
    apply_overrides,
    resolve_recipe_path,
    validate_recipe,
)


def read_config(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Path, dict]:
    """Read a recipe or config file and apply ``--set`` overrides (in the file's own keys).

    Raises:
        RecipeError: unreadable YAML or a file that is not a mapping.
    """
    path = resolve_recipe_path(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    ddir = data.get("dataset_dir")
    if isinstance(ddir, str) and not Path(ddir).expanduser().is_absolute() \
            and not Path(ddir).is_dir() and (path.parent / ddir).is_dir():
        data["dataset_dir"] = str(path.parent / ddir)  # LLaMA-Factory's folder next to the recipe
    return path, data


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, pm=None):
    """Read a plugtune recipe, or an axolotl / LLaMA-Factory / TRL config, and validate it.

    The dialect is detected from the keys (:mod:`plugtune.config.dialects`); ``overrides``
    use the file's own key names. Imports no torch: a bad config fails in milliseconds.

    Returns:
        ``(recipe, translation)``: the validated :class:`Recipe` and the
        :class:`~plugtune.config.dialects.Translation` (dialect, notices, resume request).

    Raises:
        RecipeError: unreadable YAML, unknown keys, wrong types, keys plugtune refuses.
    """
    path, data = read_config(name_or_path, overrides)
    tr = translate(data, source=str(path))
    try:
        return validate_recipe(tr.data, source=str(path), pm=pm), tr
    except RecipeError as exc:
        raise RecipeError(tr.explain(str(exc))) from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, pm=None) -> Recipe:
    """Read, override and validate a recipe (any dialect: see :func:`load_config`).

    Relative dataset and model paths in a recipe file are resolved against the current
    directory first, then against the recipe file's folder.

    Raises:
        RecipeError: unreadable YAML, unknown keys, wrong types (message names the key path).
    """
    return load_config(name_or_path, overrides, pm=pm)[0]
