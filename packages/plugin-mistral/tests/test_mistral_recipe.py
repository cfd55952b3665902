"""The bundled Mistral-7B [INST] recipe: valid, routed here, runnable on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugtune.config import load_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.testing import run_bundled_recipe
from plugtune.train import build_spec


def test_recipe_is_valid_and_routes_to_plugin_mistral(tiny_dir):
    rec = load_recipe("mistral-7b-inst", [f"base_model={tiny_dir}"])
    assert (rec.quantization, rec.chat_template, rec.sample_packing) == ("4bit", "mistral", True)
    spec = build_spec(rec, get_plugin_manager())
    assert spec.plugin == "plugtune-mistral"


@pytest.mark.slow
def test_recipe_runs_on_tiny_model(tiny_dir, tmp_path):
    """``plugtune train mistral-7b-inst --set base_model=<tiny> --set max_steps=2``
    (one micro-batch per step here to stay under a minute; the recipe's own accumulation of
    16 / 8 micro-batches per step was run by hand)."""
    root = Path(__file__).resolve().parents[3]  # the recipe's data path is relative to it
    out = tmp_path / "run"
    _, m = run_bundled_recipe("mistral-7b-inst", tiny_dir, out, root,
                              "gradient_accumulation_steps=1", "max_steps=4", "learning_rate=0.01",
                              "warmup_ratio=0", "logging_steps=1", needs="llama_factory")
    assert m["global_step"] == 4 and m["last_logged_loss"] < m["first_logged_loss"], m
    assert "[INST]" in (out / "tokenizer_config.json").read_text() + "".join(
        p.read_text() for p in out.glob("chat_template.jinja"))
