"""Shared fixtures: the real Mistral v0.1 tokenizer, a tiny Mistral folder, a tiny dataset."""

from __future__ import annotations

import json

import pytest

from plugtune.testing import load_shared_tokenizer


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def mistral_tokenizer():
    return load_shared_tokenizer("mistral_v1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, mistral_tokenizer):
    """A tiny Mistral (sliding window 16) + the real tokenizer on disk."""
    from plugtune_mistral.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-mistral"), mistral_tokenizer)


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Eight short Alpaca records in a jsonl file."""
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
    p = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
