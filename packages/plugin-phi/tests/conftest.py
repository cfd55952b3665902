"""Shared fixtures: Llama 2's tokenizer made into Phi-3's vocabulary, tiny Phi-3 folders, a
plugin manager with this (not installed) plugin loaded, a tiny dataset."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

from plugtune.plugins import get_plugin_manager
from plugtune.testing import load_shared_tokenizer

#: the plugin as PLUGTUNE_LOAD_PLUGINS names it when the package is not installed
MODULE = "plugtune_phi.plugin"
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
def phi_tok():
    from plugtune_phi.tiny import phi3_tokenizer

    return phi3_tokenizer(load_shared_tokenizer("llama2"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``{variant: folder}``: tiny phi3 / phi4_mini + the Phi-3 vocabulary, no chat template."""
    from plugtune_phi.tiny import VARIANTS, phi3_tokenizer, save_tiny

    tok = phi3_tokenizer(load_shared_tokenizer("llama2"))
    return {v: save_tiny(tmp_path_factory.mktemp(f"tiny-{v}"), tok, v) for v in VARIANTS}


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Eight two-turn ``messages`` records."""
    rows = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                          {"role": "assistant", "content": f"{a + b}."},
                          {"role": "user", "content": "Doubled?"},
                          {"role": "assistant", "content": f"{2 * (a + b)}."}]}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
    p = tmp_path_factory.mktemp("data") / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
