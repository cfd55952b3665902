"""The plugin contract for plugtune-t5 with tiny configs and the real T5 tokenizer."""

from __future__ import annotations

from transformers import AutoModelForSeq2SeqLM, MT5Config, UMT5Config

from plugtune.testing import PluginContract, load_shared_tokenizer
from plugtune_t5.tiny import tiny_t5


class TestFlanT5Contract(PluginContract):
    plugin_name = "plugtune-t5"
    model_type = "t5"

    def make_tokenizer(self):
        return load_shared_tokenizer("t5")

    def make_model(self):
        return tiny_t5()  # gated-GELU like FLAN-T5, vocab 32128, untied lm_head


class TestMT5Contract(TestFlanT5Contract):
    model_type = "mt5"

    def make_model(self):
        cfg = MT5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return AutoModelForSeq2SeqLM.from_config(cfg)


class TestUMT5Contract(TestFlanT5Contract):
    model_type = "umt5"

    def make_model(self):
        cfg = UMT5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return AutoModelForSeq2SeqLM.from_config(cfg)
