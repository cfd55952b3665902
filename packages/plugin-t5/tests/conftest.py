"""Shared fixtures: the real T5 tokenizer and a tiny FLAN-T5-shaped model saved to a tmp dir."""

from __future__ import annotations

import pytest

from plugtune.testing import load_shared_tokenizer


@pytest.fixture(scope="session")
def t5_tokenizer():
    return load_shared_tokenizer("t5")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, t5_tokenizer):
    """A tiny gated-GELU T5 (vocab 32128, d_model 64, 2+2 layers) + the real tokenizer on disk."""
    from plugtune_t5.tiny import save_tiny_t5

    return save_tiny_t5(tmp_path_factory.mktemp("tiny-flan-t5"), t5_tokenizer)
