"""Shared helpers: real tokenizers (cached), tiny models + offline processors, real images."""

from __future__ import annotations

import functools

import pytest

from plugtune.testing import load_shared_tokenizer, shared_path

MODEL_TYPES = ["mllama", "qwen2_vl", "qwen2_5_vl", "molmo2", "qwen3_vl", "gemma3", "smolvlm"]
#: the model types of today's VLM table (test_vlm_table.py); llava and llava_next have no
#: family row and go through the generic image_text route
TABLE = ["qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm", "idefics3", "llava", "llava_next"]
GENERIC_ONLY = ("llava", "llava_next")


@functools.cache
def tokenizer_for(model_type: str):
    """The family's real tokenizer with its image tokens added, shared by the tests of one
    session (loading takes seconds and a deep copy as long; tests only set what they need:
    the chat template it already has, padding side restored after generation)."""
    from plugtune_vision.tiny import TOKENIZER_OF, prepare_tokenizer

    return prepare_tokenizer(model_type, load_shared_tokenizer(TOKENIZER_OF[model_type]))


def demo_image(name: str) -> str:
    return str(shared_path("llama_factory", "mllm_demo_data", name))


def caption_image(name: str) -> str:
    return str(shared_path("vision", "skimage_clip_captions", name))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``model_type -> folder`` with a tiny model + processor saved (built on first use)."""
    from plugtune_vision.tiny import save_tiny

    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[model_type] = str(save_tiny(model_type, path, tokenizer_for(model_type)))
        return cache[model_type]

    return get
