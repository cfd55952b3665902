"""The plugin contract for Mistral: Zephyr template and Mistral-Instruct ``[INST]`` template."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from plugtune.testing import PluginContract
from plugtune_mistral.tiny import tiny_config


class TestZephyrContract(PluginContract):
    plugin_name = "plugtune-mistral"
    model_type = "mistral"
    recipe = {"chat_template": "zephyr"}
    tokenizer_name = "mistral_v1"

    def make_model(self):
        return AutoModelForCausalLM.from_config(tiny_config(len(self.make_tokenizer()), sliding_window=8))


class TestMistralInstContract(TestZephyrContract):
    recipe = {"chat_template": "mistral"}
