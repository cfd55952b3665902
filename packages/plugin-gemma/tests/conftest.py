"""Shared fixtures: the plugin loaded (installed entry point, or the module when the package is
not installed), the real Gemma 3 tokenizer, tiny saved Gemma models."""

from __future__ import annotations

import pytest

from plugtune.testing import load_shared_tokenizer, plugin_name

#: the name ``plugtune.plugins`` registers this plugin under: its entry point when installed
#: (nox, CI), else the module, imported through ``PLUGTUNE_LOAD_PLUGINS``
PLUGIN_NAME = plugin_name("plugtune_gemma.plugin")


@pytest.fixture(autouse=True)
def _only_this_plugin(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PLUGTUNE_LOAD_PLUGINS", PLUGIN_NAME)


@pytest.fixture(scope="session")
def gemma_tok():
    """The real Gemma 3 tokenizer (``../shared/data/tokenizers/gemma3``; skips when absent)."""
    return load_shared_tokenizer("gemma3")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, gemma_tok):
    """``model_type -> folder`` of a tiny model saved with the Gemma 3 tokenizer, built on first use."""
    from plugtune_gemma.tiny import save_tiny

    cache: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = save_tiny(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"),
                                          gemma_tok)
        return cache[model_type]

    return get
