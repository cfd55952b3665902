"""The plugin contract for each family of plugtune-llama, with tiny configs + real tokenizers."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from plugtune.testing import PluginContract
from plugtune_llama.tiny import tiny_config


class _Tiny(PluginContract):
    plugin_name = "plugtune-llama"
    family = "llama"
    tokenizer_name = "llama2"

    def make_model(self):
        cfg = tiny_config(self.family, len(self.make_tokenizer()))
        impl = "eager" if self.family == "bloom" else "sdpa"
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)


class TestLlama2Contract(_Tiny):
    model_type = "llama"
    recipe = {"chat_template": "llama2"}


class TestLlama32Contract(_Tiny):
    """Llama 3.2 tokenizer with its own chat template (``<|eot_id|>`` ends a turn)."""

    model_type = "llama"
    tokenizer_name = "llama3_2"


class TestQwen25Contract(_Tiny):
    """Qwen2.5 tokenizer (ChatML template, ``<|im_end|>``) on a tiny Qwen2Config."""

    model_type = "qwen2"
    family = "qwen2"
    tokenizer_name = "qwen2_5"


class TestBloomContract(_Tiny):
    """Tiny BloomConfig paired with the real Falcon tokenizer (BLOOM's own is not in ../shared)."""

    model_type = "bloom"
    family = "bloom"
    tokenizer_name = "falcon"
    recipe = {"chat_template": "alpaca"}
