"""plugtune's plugin contract on a tiny Phi-3 with the Phi-3 vocabulary."""

from __future__ import annotations

from plugtune.testing import PluginContract, load_shared_tokenizer, plugin_name

#: the plugin as PLUGTUNE_LOAD_PLUGINS names it when the package is not installed (conftest)
MODULE = "plugtune_phi.plugin"
#: its name in the plugin manager (entry-point name once installed)
PLUGIN_NAME = plugin_name(MODULE)


class TestPhiContract(PluginContract):
    plugin_name = PLUGIN_NAME
    model_type = "phi3"
    recipe = {"chat_template": "phi_3"}

    def make_model(self):
        from transformers import AutoModelForCausalLM

        from plugtune_phi.tiny import tiny_config

        tok = self.make_tokenizer()
        return AutoModelForCausalLM.from_config(tiny_config(
            len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))

    def make_tokenizer(self):
        from plugtune_phi.tiny import phi3_tokenizer

        cache = type(self).__dict__.get("_tokenizer_cache")
        if cache is None:
            cache = phi3_tokenizer(load_shared_tokenizer("llama2"))
            type(self)._tokenizer_cache = cache
        return cache
