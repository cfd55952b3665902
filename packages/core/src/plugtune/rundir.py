"""The run directory: written atomically (temp folder, then ``os.replace`` per file)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from plugtune.config import Recipe, dump_recipe
from plugtune.spec import ModelSpec


def _atomic_write(path: Path, data: str | bytes) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, mode) as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_run(output_dir: Path, model, tokenizer, recipe: Recipe, spec: ModelSpec, metrics: dict,
             log_history: list[dict], stats: dict, state_dict: dict | None = None,
             processor=None) -> None:
    """Write the run directory atomically: everything goes to a temp folder, then each file is
    moved into place with ``os.replace`` (a crash never leaves a half-written adapter).

    ``state_dict``: the full (gathered) weights when the live parameters are sharded, e.g.
    under DeepSpeed ZeRO-3 (see :func:`plugtune.scale.gathered_state_dict`); ``None`` saves the
    model's own parameters. ``processor`` (vision families) is saved beside the tokenizer, so
    ``plugtune generate`` rebuilds the same image preprocessing."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
    try:
        if state_dict is not None:
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        from plugtune.export.portable import finish_run_folder

        finish_run_folder(staging, spec, tokenizer, model, recipe)  # absolute base, stops, provenance
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        _write_reports(staging, recipe, spec, metrics, log_history, stats, tokenizer)
        for f in staging.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_reports(folder: Path, recipe: Recipe, spec: ModelSpec, metrics: dict,
                   log_history: list[dict], stats: dict, tokenizer=None) -> None:
    from plugtune.report import model_card, plot_title, training_png

    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (folder / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    (folder / "log_history.json").write_text(json.dumps(log_history, indent=2, default=str))
    training_png(log_history, folder / "training.png", plot_title(recipe, spec))
    ac = folder / "adapter_config.json"
    if not ac.is_file():
        ac = Path(recipe.output_dir) / "adapter_config.json"
    base = json.loads(ac.read_text())["base_model_name_or_path"] if ac.is_file() else None
    if tokenizer is None:  # update_reports: the saved tokenizer (the card shows its prompt format)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir)
        except Exception:  # noqa: BLE001 - the card is written without the prompt format
            tokenizer = None
    vocab = getattr(getattr(spec.hf_config, "get_text_config", lambda: spec.hf_config)(),
                    "vocab_size", None)
    added = bool(vocab and tokenizer is not None and len(tokenizer) > vocab)
    (folder / "README.md").write_text(model_card(
        recipe, spec, metrics, stats, tokenizer=tokenizer,
        run_dir=str(Path(recipe.output_dir).resolve()), base=base, added_tokens=added))


def update_reports(output_dir: Path, recipe: Recipe, spec: ModelSpec, metrics: dict,
                   log_history: list[dict], stats: dict) -> None:
    """Rewrite a saved run's metrics, log history, loss curve and model card (after its
    evaluation), each file replaced atomically."""
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
    try:
        _write_reports(staging, recipe, spec, metrics, log_history, stats)
        for f in staging.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
