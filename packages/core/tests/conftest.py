"""Shared fixtures: a tiny Llama saved to disk with a real or demo tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # demo resources are materialized once per session into a temp PLUGTUNE_HOME
    home = tmp_path_factory.getbasetemp() / "plugtune-home"
    monkeypatch.setenv("PLUGTUNE_HOME", str(home))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # core tests never depend on family plugins: only the test family module is loaded
    # (also in subprocesses, through PYTHONPATH)
    monkeypatch.setenv("PLUGTUNE_LOAD_PLUGINS", "plugtune_test_families")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))


def tiny_llama(vocab_size: int, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture
def make_tiny_llama():
    return tiny_llama


@pytest.fixture
def demo_model_dir(tmp_path_factory):
    """The demo's tiny Llama + char tokenizer (made by the package, no ../shared needed)."""
    from plugtune.demo import materialize

    return materialize("demo://tiny-llama")
