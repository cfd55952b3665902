"""Shared fixtures: the real Falcon tokenizer, tiny Falcon folders (native and legacy), data."""

from __future__ import annotations

import json

import pytest

from plugtune.testing import load_shared_tokenizer


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def falcon_tokenizer():
    return load_shared_tokenizer("falcon")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, falcon_tokenizer):
    """``(variant, legacy) -> folder`` of a tiny Falcon + the real tokenizer, built on first use."""
    from plugtune_falcon.tiny import save_tiny

    cache: dict[tuple[str, bool], object] = {}

    def get(variant: str, legacy: bool = False):
        key = (variant, legacy)
        if key not in cache:
            dest = tmp_path_factory.mktemp(f"falcon-{variant}{'-legacy' if legacy else ''}")
            cache[key] = save_tiny(variant, dest, falcon_tokenizer, legacy=legacy)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Eight short Alpaca records in a jsonl file."""
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
    p = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
