"""End to end per family: ``plugtune.train.train`` on the real images (LLaMA-Factory mllm_demo +
scikit-image captions), then ``plugtune generate RUN_DIR --prompt ... --image ...``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import MODEL_TYPES, caption_image, demo_image

from plugtune.testing import shared_path


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_run_loss_falls_and_generate_with_an_image(model_type, tiny_dirs, tmp_path, capsys):
    from plugtune.cli import main
    from plugtune.config import validate_recipe
    from plugtune.train import train

    run = tmp_path / "run"
    text_only = tmp_path / "text_only.json"
    text_only.write_text(json.dumps([{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."}]}]))
    # one micro-batch of 3 every step: an image/caption pair, a two-image two-turn chat and a
    # text-only chat, so the logged loss is that of one fixed mixed batch (no dropout)
    recipe = validate_recipe({
        "base_model": tiny_dirs(model_type), "output_dir": str(run),
        "datasets": [
            {"path": str(shared_path("vision", "skimage_clip_captions", "captions.json")),
             "type": "vision", "max_samples": 1},
            {"path": str(shared_path("llama_factory", "mllm_demo.json")), "type": "vision",
             "max_samples": 1},
            {"path": str(text_only), "type": "vision"},
        ],
        "sequence_len": 512, "micro_batch_size": 3, "max_steps": 6, "learning_rate": 1e-2,
        "lr_scheduler": "constant", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "logging_steps": 1, "save_total_limit": 1, "group_by_length": False,
    })
    result = train(recipe)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    assert all(b < a + 0.02 for a, b in zip(losses, losses[1:])), f"loss not falling: {losses}"
    m = result.metrics
    assert 0 < m["trainable_params"] < 0.01 * m["total_params"]
    stats = json.loads((run / "data_stats.json").read_text())
    assert (stats["samples"], stats["rows"], stats["dropped"]) == (3, 3, 0)
    saved = {p.name for p in Path(run).iterdir()}
    assert {"adapter_model.safetensors", "processor_config.json", "recipe.yaml"} <= saved
    capsys.readouterr()
    image = caption_image("chelsea.png") if model_type == "mllama" else demo_image("2.jpg")
    rc = main(["generate", str(run), "--prompt", "Who is he?", "--image", image,
               "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip(), out
    rc = main(["generate", str(run), "--prompt", "<image>Who is he?", "--image",
               str(tmp_path / "nope.jpg")])
    assert rc == 2
    assert "nope.jpg" in capsys.readouterr().err.replace("\n", "")
