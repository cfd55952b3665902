"""The plugin contract for each family of plugtune-llama, with tiny configs + real tokenizers."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig

from plugtune.testing import PluginContract, load_shared_tokenizer


class TestLlama2Contract(PluginContract):
    plugin_name = "plugtune-llama"
    model_type = "llama"
    recipe = {"chat_template": "llama2"}

    def make_tokenizer(self):
        return load_shared_tokenizer("llama2")

    def make_model(self):
        cfg = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return AutoModelForCausalLM.from_config(cfg)
