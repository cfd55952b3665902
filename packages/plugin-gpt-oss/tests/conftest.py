"""Shared fixtures: the nearest real tokenizer with the harmony template, a tiny gpt-oss folder,
a plugin manager with this (not installed) plugin loaded."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

from plugtune.plugins import get_plugin_manager
from plugtune.testing import load_shared_tokenizer

#: the plugin as PLUGTUNE_LOAD_PLUGINS names it when the package is not installed
MODULE = "plugtune_gpt_oss.plugin"
#: installed (nox, CI): the entry point loads it; naming it again in PLUGTUNE_LOAD_PLUGINS would
#: make core import the module a second time under its module name
INSTALLED = any(ep.value == MODULE for ep in md.entry_points(group="plugtune"))
#: the environment the plugin manager is built from
ENV = {} if INSTALLED else {"PLUGTUNE_LOAD_PLUGINS": MODULE}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path_factory.getbasetemp() / "plugtune-home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def pm():
    return get_plugin_manager(ENV)


@pytest.fixture
def harmony_tok():
    """Llama 3.2's tokenizer (tiktoken-style BPE like gpt-oss's o200k_harmony) without its own
    template, given the harmony template and special tokens."""
    from plugtune_gpt_oss.harmony import install_template

    tok = load_shared_tokenizer("llama3_2")
    tok.chat_template = None
    install_template(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny gpt-oss + the llama3_2 tokenizer (harmony tokens added, no template) on disk."""
    from plugtune_gpt_oss.harmony import SPECIAL_TOKENS
    from plugtune_gpt_oss.tiny import save_tiny

    tok = load_shared_tokenizer("llama3_2")
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                           replace_extra_special_tokens=False)
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt-oss"), tok)


@pytest.fixture(scope="session")
def reasoning_jsonl(tmp_path_factory):
    """Eight one-answer ``messages`` records (developer instructions, reasoning in ``thinking``)."""
    rows = []
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]:
        rows.append({"messages": [
            {"role": "developer", "content": "Answer with one sentence."},
            {"role": "user", "content": f"Add {a} and {b}, then double it."},
            {"role": "assistant", "content": f"{2 * (a + b)}.",
             "thinking": f"{a} plus {b} is {a + b}; times 2 is {2 * (a + b)}."}]})
    p = tmp_path_factory.mktemp("data") / "reasoning.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
