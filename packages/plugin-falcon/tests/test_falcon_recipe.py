"""The bundled Falcon-7B QLoRA recipe: valid, routed here (native and legacy), runnable on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugtune.config import load_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.testing import run_bundled_recipe
from plugtune.train import build_spec


@pytest.mark.parametrize("legacy", [False, True])
def test_recipe_is_valid_and_routes_to_plugin_falcon(tiny_dirs, legacy):
    rec = load_recipe("falcon-7b-qlora", [f"base_model={tiny_dirs('new_decoder', legacy)}"])
    assert (rec.quantization, rec.sequence_len, rec.lora_target_modules) == ("4bit", 512, "all-linear")
    spec = build_spec(rec, get_plugin_manager())
    assert spec.plugin == "plugtune-falcon" and spec.family.name == "falcon"
    assert spec.model_type == ("RefinedWeb" if legacy else "falcon")


@pytest.mark.slow
def test_recipe_runs_on_tiny_legacy_model(tiny_dirs, tmp_path):
    """``plugtune train falcon-7b-qlora --set base_model=<tiny RefinedWeb> --set max_steps=2``
    (one micro-batch per step here to stay under a minute; the recipe's own accumulation of
    16 / 8 micro-batches per step was run by hand)."""
    root = Path(__file__).resolve().parents[3]  # the recipe's data path is relative to it
    out = tmp_path / "run"
    stdout, m = run_bundled_recipe("falcon-7b-qlora", tiny_dirs("new_decoder", True), out, root,
                                   "gradient_accumulation_steps=1", "max_steps=4",
                                   "learning_rate=0.01", "warmup_ratio=0", "logging_steps=1")
    assert "model_type=RefinedWeb family=falcon" in stdout
    assert m["global_step"] == 4 and m["last_logged_loss"] < m["first_logged_loss"], m
