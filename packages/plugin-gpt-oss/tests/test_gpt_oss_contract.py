"""plugtune's plugin contract on a tiny gpt-oss with the harmony template."""

from __future__ import annotations

from plugtune.testing import PluginContract, load_shared_tokenizer, plugin_name

#: the plugin as PLUGTUNE_LOAD_PLUGINS names it when the package is not installed (conftest)
MODULE = "plugtune_gpt_oss.plugin"
#: its name in the plugin manager (entry-point name once installed)
PLUGIN_NAME = plugin_name(MODULE)


class TestGptOssContract(PluginContract):
    plugin_name = PLUGIN_NAME
    model_type = "gpt_oss"

    def make_model(self):
        from transformers import AutoModelForCausalLM

        from plugtune_gpt_oss.tiny import tiny_config

        return AutoModelForCausalLM.from_config(tiny_config(len(self.make_tokenizer())),
                                                attn_implementation="eager")

    def make_tokenizer(self):
        from plugtune_gpt_oss.harmony import install_template

        cache = type(self).__dict__.get("_tokenizer_cache")
        if cache is None:
            cache = load_shared_tokenizer("llama3_2")
            cache.chat_template = None
            install_template(cache)
            type(self)._tokenizer_cache = cache
        return cache
