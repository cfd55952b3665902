"""Shared fixtures: the plugin loaded (installed or not), the real Qwen3 tokenizer."""

from __future__ import annotations

import pytest

from plugtune.testing import load_shared_tokenizer

#: loads plugtune-qwen3 whether it is installed (entry point, whose value this is) or only on
#: the path (imported as a module), and no other family plugin
PLUGIN = "plugtune_qwen3.plugin"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("PLUGTUNE_LOAD_PLUGINS", PLUGIN)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def qwen3_tok():
    """A fresh real Qwen3 tokenizer (skips without ../shared)."""
    return load_shared_tokenizer("qwen3")
