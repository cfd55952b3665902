"""Load a finished run directory (base + adapter, or full weights) for generation/evaluation."""

from __future__ import annotations

from pathlib import Path

import yaml

from plugtune.config import RecipeError, validate_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.spec import Loaded, ModelSpec


class RunDirError(FileNotFoundError):
    """A run directory is missing or incomplete."""


def load_run_spec(run_dir: str | Path, pm=None) -> tuple[ModelSpec, bool, object]:
    """The spec of a run directory without loading weights: ``(spec, has_adapter, pm)``.

    ``spec.recipe`` is the run's recipe with the tokenizer (and, for full weights, the base
    model) pointing at ``run_dir``.

    Raises:
        RunDirError: no ``recipe.yaml`` / weights in ``run_dir``.
    """
    from plugtune.train import build_spec

    run = Path(run_dir)
    rp = run / "recipe.yaml"
    if not rp.is_file():
        raise RunDirError(f"{run} is not a plugtune run directory (no recipe.yaml)")
    data = yaml.safe_load(rp.read_text())
    pm = pm or get_plugin_manager()
    try:
        recipe = validate_recipe(data, source=str(rp), pm=pm)
    except RecipeError as exc:
        raise RunDirError(str(exc)) from exc
    adapter = (run / "adapter_config.json").is_file()
    if not adapter and not (run / "config.json").is_file():
        raise RunDirError(f"{run} holds neither an adapter nor full weights")
    updates = {"tokenizer": str(run)}
    if not adapter:
        updates["base_model"] = str(run)
    else:  # the base as recorded at training time: loads from any working directory
        from plugtune.export.portable import BaseModelMissing, resolve_base

        try:
            updates["base_model"] = resolve_base(run, recipe.base_model)
        except BaseModelMissing as exc:
            raise RunDirError(str(exc)) from exc
    recipe = recipe.model_copy(update=updates)
    return build_spec(recipe, pm), adapter, pm


def load_run(run_dir: str | Path, pm=None) -> tuple[ModelSpec, Loaded, object]:
    """Load ``run_dir`` written by ``plugtune train``.

    The base model is loaded through ``plugtune_load`` (so family quirks and quantization
    apply), the tokenizer from the run directory (it carries the chat template), and the
    adapter with ``peft.PeftModel.from_pretrained`` when ``adapter_config.json`` exists.

    Returns:
        ``(spec, loaded, pm)``.

    Raises:
        RunDirError: no ``recipe.yaml`` / weights in ``run_dir``.
    """
    run = Path(run_dir)
    spec, adapter, pm = load_run_spec(run, pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    if spec.quantization == "4bit":
        from plugtune.kbit import cpu_4bit_fallback

        cpu_4bit_fallback(loaded.model)
    if adapter:
        from peft import PeftModel

        if len(loaded.tokenizer) > loaded.model.get_input_embeddings().weight.shape[0]:
            loaded.model.resize_token_embeddings(len(loaded.tokenizer))
        from plugtune.moe import prepare_adapter_load

        prepare_adapter_load(loaded.model, run)  # MoE expert weights' layout, as in training
        loaded.model = PeftModel.from_pretrained(loaded.model, str(run))
    loaded.model.eval()
    return spec, loaded, pm
