"""Integration: every plugin installed together, real inputs from ../shared/data."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from plugtune.plugins import get_plugin_manager, routing_table

PLUGINS = {
    "plugtune-t5": {"t5", "mt5", "umt5"},
    "plugtune-llama": {"llama", "qwen2", "bloom"},
    "plugtune-falcon": {"falcon", "RefinedWeb", "RefinedWebModel"},
    "plugtune-mistral": {"mistral"},
    "plugtune-vision": {"mllama", "qwen2_vl", "qwen2_5_vl", "molmo2"},
}


def test_cli_lists_the_five_plugins_with_families_and_versions():
    out = subprocess.run([sys.executable, "-m", "plugtune", "plugins", "--json"], check=True,
                         capture_output=True, text=True).stdout
    info = {p["name"]: p for p in json.loads(out)}
    for name, types in PLUGINS.items():
        assert name in info, f"{name} not discovered through the 'plugtune' entry point"
        claimed = {t for f in info[name]["families"] for t in f["model_types"]}
        assert types <= claimed
        assert info[name]["version"] == "0.1.0" and info[name]["distribution"] == name
        assert "plugtune_families" in info[name]["hooks"]


def test_all_plugins_together_have_no_routing_conflict():
    table = routing_table(get_plugin_manager())
    for name, types in PLUGINS.items():
        for t in types:
            assert table[t].plugin == name


def test_disable_env_removes_a_plugin_from_routing(monkeypatch):
    pm = get_plugin_manager(env={"PLUGTUNE_DISABLE_PLUGINS": "plugtune-falcon"})
    assert "falcon" not in routing_table(pm)
    assert not pm.has_plugin("plugtune-falcon")


@pytest.mark.slow
def test_stories260k_dolly_lora_through_plugin_llama(tmp_path):
    """The bundled real recipe, routed to plugtune-llama, from the CLI; then generate."""
    from plugtune.testing import shared_path

    model = shared_path("models", "stories260K", "hf")
    dolly = shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "plugtune", "train", "stories260k-dolly-lora",
           "--set", f"base_model={model}", "--set", f"datasets.0.path={dolly}",
           "--set", f"output_dir={out}", "--set", "max_steps=10", "--set", "sequence_len=256",
           "--set", "val_set_size=8", "--set", "logging_steps=1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plugin plugtune-llama" in res.stdout
    hist = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] is not None and metrics["trainable_params"] < metrics["total_params"]
    gen = subprocess.run([sys.executable, "-m", "plugtune", "generate", str(out), "--prompt",
                          "Tell me about cats.", "--max-new-tokens", "20"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(gen.stdout.strip()) > 5
