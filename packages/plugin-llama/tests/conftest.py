"""Shared fixtures: real tokenizers, tiny saved models per family, a tiny chat dataset."""

from __future__ import annotations

import json

import pytest

from plugtune.testing import load_shared_tokenizer

#: family -> (shared tokenizer, chat_template for recipes: None = the tokenizer's own)
PAIRS = {
    "llama2": ("llama", "llama2", "llama2"),
    "llama3": ("llama", "llama3_2", None),
    "qwen2": ("qwen2", "qwen2_5", None),
    "bloom": ("bloom", "falcon", "alpaca"),
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``name -> folder`` of a tiny model saved with its real tokenizer, built on first use."""
    from plugtune_llama.tiny import save_tiny

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            family, tok_name, _ = PAIRS[name]
            tok = load_shared_tokenizer(tok_name)
            cache[name] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{name}"), tok)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Eight short Alpaca records (instruction, input, output) in a jsonl file."""
    rows = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
    ]
    p = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
