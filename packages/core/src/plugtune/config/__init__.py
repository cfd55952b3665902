"""The recipe (:mod:`plugtune.config.schema`) and the config dialects of other tools
(:mod:`plugtune.config.dialects`: axolotl, LLaMA-Factory, TRL). Imports no torch."""

from plugtune.config.loading import load_config, load_recipe, read_config  # noqa: E402
from plugtune.config.schema import (
    DATASET_TYPES,
    DatasetConfig,
    GenerationConfig,
    Recipe,
    RecipeError,
    apply_overrides,
    bundled_recipes_dir,
    did_you_mean,
    dump_recipe,
    format_validation_error,
    list_bundled_recipes,
    resolve_recipe_path,
    validate_recipe,
)

__all__ = [
    "DATASET_TYPES", "DatasetConfig", "GenerationConfig", "Recipe", "RecipeError",
    "apply_overrides", "bundled_recipes_dir", "did_you_mean", "dump_recipe",
    "format_validation_error", "list_bundled_recipes", "load_config", "load_recipe",
    "read_config", "resolve_recipe_path", "validate_recipe",
]
