"""The bundled Llama 2 / BLOOMZ / Qwen2.5 recipes: valid, routed here, and runnable on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugtune.config import load_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.testing import run_bundled_recipe
from plugtune.train import build_spec

#: 4 steps at a learning rate high enough that the loss of a random tiny model must fall
FALLING = ("max_steps=4", "learning_rate=0.01", "warmup_ratio=0", "logging_steps=1")
RECIPES = {
    # name: (tiny model, quantization, sequence_len, packing)
    "llama2-7b-qlora-dolly-packed": ("llama2", "4bit", 2048, True),
    "bloomz-7b1-lora-8bit": ("bloom", "8bit", 512, False),
    "qwen2.5-7b-lora": ("qwen2", None, 1024, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_valid_and_routes_to_plugin_llama(name, tiny_dirs):
    tiny, quant, seq, packing = RECIPES[name]
    rec = load_recipe(name, [f"base_model={tiny_dirs(tiny)}", "max_steps=2"])
    assert (rec.quantization, rec.sequence_len, rec.sample_packing) == (quant, seq, packing)
    spec = build_spec(rec, get_plugin_manager())
    assert spec.plugin == "plugtune-llama" and spec.quantization == quant


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2-7b-qlora-dolly-packed", "bloomz-7b1-lora-8bit"])
def test_recipe_runs_on_tiny_model(name, tiny_dirs, tmp_path):
    """``plugtune train NAME --set base_model=<tiny> --set max_steps=4 ...`` (the Qwen2.5 recipe is
    left out: its 152k vocabulary at 16 x 2048 tokens per step takes minutes on a CPU)."""
    root = Path(__file__).resolve().parents[3]  # the recipes' data paths are relative to it
    _, m = run_bundled_recipe(name, tiny_dirs(RECIPES[name][0]), tmp_path / "run", root, *FALLING)
    assert m["global_step"] == 4 and m["last_logged_loss"] < m["first_logged_loss"], m
