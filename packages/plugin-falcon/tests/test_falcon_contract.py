"""The plugin contract for Falcon: multi-query (7B layout) and new decoder architecture (40B)."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from plugtune.testing import PluginContract
from plugtune_falcon.tiny import tiny_config


class _Falcon(PluginContract):
    plugin_name = "plugtune-falcon"
    model_type = "falcon"
    recipe = {"chat_template": "alpaca"}
    variant = "multi_query"
    tokenizer_name = "falcon"

    def make_model(self):
        return AutoModelForCausalLM.from_config(tiny_config(self.variant, len(self.make_tokenizer())))


class TestFalconMultiQueryContract(_Falcon):
    variant = "multi_query"


class TestFalconNewDecoderContract(_Falcon):
    variant = "new_decoder"


class TestRefinedWebModelContract(_Falcon):
    """The legacy model type routes to this plugin and gets the same hooks."""

    model_type = "RefinedWebModel"
