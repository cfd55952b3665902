"""Run folders that load from anywhere, with plain ``transformers`` / ``peft``.

* ``adapter_config.json`` names the base as a hub id (kept as written) or as an absolute,
  resolved local path, so ``PeftModel`` / ``AutoPeftModelForCausalLM`` /
  ``AutoModelForCausalLM.from_pretrained(run)`` work from any working directory;
* ``generation_config.json`` stops on EOS *and* the chat template's end-of-turn token;
* ``plugtune_base.json`` records where the base came from (the recipe's ``base_model``, its
  absolute path, and the folder actually loaded, e.g. the de-quantized GGUF cache), so
  :func:`resolve_base` can find it again or say exactly what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_INFO = "plugtune_base.json"


class BaseModelMissing(FileNotFoundError):
    """The base model a run was trained on is no longer where the run folder says."""


def is_local(ref: str) -> bool:
    """True when ``ref`` names a local path (exists, or looks like one) rather than a hub id."""
    return (Path(ref).expanduser().exists() or ref.startswith((".", "/", "~"))
            or ref.endswith(".gguf") or ref.count("/") > 1)


def base_reference(path: str) -> str:
    """A hub id unchanged; a local path made absolute (``~`` expanded, symlinks resolved)."""
    if path.startswith("demo://") or not is_local(path):
        return path
    return str(Path(path).expanduser().resolve())


def write_generation_config(folder: str | Path, tokenizer, model=None) -> None:
    """Write ``generation_config.json`` into ``folder``: the model's own settings (if any) with
    ``eos_token_id`` = EOS + the chat template's end-of-turn token (e.g. ``<|im_end|>``) and the
    tokenizer's ``pad`` / ``bos`` ids, so ``generate()`` and pipelines stop where training taught
    the model to stop."""
    from transformers import GenerationConfig

    from plugtune.modeling import stop_token_ids

    base = getattr(model, "generation_config", None)
    cfg = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    stops = stop_token_ids(tokenizer, model)
    if stops:
        cfg.eos_token_id = stops if len(stops) > 1 else stops[0]
    if tokenizer.pad_token_id is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        cfg.bos_token_id = tokenizer.bos_token_id
    cfg.save_pretrained(folder)


def finish_run_folder(folder: str | Path, spec, tokenizer, model=None, recipe=None) -> None:
    """Make a freshly written run folder portable (see the module docstring).

    Args:
        folder: the (staging) run folder holding the adapter or full weights.
        spec: the run's :class:`plugtune.spec.ModelSpec` (``spec.path`` = the folder loaded).
        tokenizer: the run's tokenizer (chat template set).
        model: the trained model (its generation config is the starting point).
        recipe: the recipe as the user wrote it (default ``spec.recipe``).
    """
    folder = Path(folder)
    loaded = base_reference(spec.path)
    ac = folder / "adapter_config.json"
    if ac.is_file():
        cfg = json.loads(ac.read_text())
        cfg["base_model_name_or_path"] = loaded
        ac.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_generation_config(folder, tokenizer, model)
    recipe_base = (recipe or spec.recipe).base_model
    info = {"base_model": recipe_base, "base_model_path": base_reference(recipe_base),
            "loaded_from": loaded, "model_type": spec.model_type, "family": spec.family.name,
            "task": spec.task}
    src = spec.extra.get("gguf_source") if spec.extra else None
    if src:
        info["gguf_source"] = src
    (folder / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")


def resolve_base(run: str | Path, recipe_base: str) -> str:
    """The base model to load an adapter run with, from any working directory.

    Order: the folder the run was loaded from (``adapter_config.json``, absolute), the recipe's
    ``base_model`` as recorded absolute at training time (a ``.gguf`` file is de-quantized
    again), then the recipe's ``base_model`` as written (hub id, or relative to this directory).

    Raises:
        BaseModelMissing: a local base that is in none of those places; the message names them.
    """
    run = Path(run)
    tried: list[str] = []
    ac = run / "adapter_config.json"
    if ac.is_file():
        ref = json.loads(ac.read_text()).get("base_model_name_or_path") or ""
        if ref and not is_local(ref):
            return ref
        if ref:
            if Path(ref).exists():
                return ref
            tried.append(f"{ref} (adapter_config.json)")
    info_file = run / RUN_INFO
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        for key in ("gguf_source", "base_model_path"):
            ref = info.get(key)
            if ref and (not is_local(ref) or ref.startswith("demo://")):
                return ref
            if ref and Path(ref).exists():
                return ref
            if ref:
                tried.append(f"{ref} ({RUN_INFO} {key})")
    if recipe_base.startswith("demo://") or (not tried and not is_local(recipe_base)):
        return recipe_base  # a hub id (never a local path recorded at training time)
    if Path(recipe_base).expanduser().exists():
        return str(Path(recipe_base).expanduser().resolve())
    tried.append(f"{recipe_base} (recipe.yaml, relative to {Path.cwd()})")
    raise BaseModelMissing(
        f"the base model of run {run} is missing; looked in: {'; '.join(dict.fromkeys(tried))}. "
        "Put the base model back, or edit base_model_name_or_path in "
        f"{ac} to where it is now")
