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
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        _write_reports(staging, recipe, spec, metrics, log_history, stats)
        for f in staging.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_reports(folder: Path, recipe: Recipe, spec: ModelSpec, metrics: dict,
                   log_history: list[dict], stats: dict) -> None:
    from plugtune.report import loss_curve_png, model_card

    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (folder / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    (folder / "log_history.json").write_text(json.dumps(log_history, indent=2, default=str))
    loss_curve_png(log_history, folder / "loss.png")
    (folder / "README.md").write_text(model_card(recipe, spec, metrics, stats))


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
