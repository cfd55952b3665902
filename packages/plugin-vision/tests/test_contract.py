"""The plugin contract for each vision family: tiny configs, real tokenizers, real images."""

from __future__ import annotations

from conftest import caption_image, demo_image, tokenizer_for

from plugtune.testing import PluginContract


class _VisionContract(PluginContract):
    plugin_name = "plugtune-vision"

    def make_tokenizer(self):
        return tokenizer_for(self.model_type)

    def make_model(self):
        from plugtune_vision.tiny import tiny_model

        return tiny_model(self.model_type, tokenizer_for(self.model_type))

    def make_processor(self, tokenizer):
        from plugtune_vision.tiny import tiny_processor

        return tiny_processor(self.model_type, tokenizer)

    def sample_features(self, spec, tokenizer) -> list[dict]:
        """An image/caption sample, a two-image chat sample and a text-only one."""
        from plugtune.data.templates import ensure_chat_template
        from plugtune.data.tokenize import probe_template
        from plugtune_vision._encode import encode_example
        from plugtune_vision._processors import FAMILIES

        proc = self.make_processor(tokenizer)
        ensure_chat_template(tokenizer, spec.recipe.chat_template)
        info = probe_template(tokenizer)
        examples = [
            {"messages": [{"role": "user", "content": "<image>Describe this image."},
                          {"role": "assistant", "content": "a facial photo of a tabby cat"}],
             "images": [caption_image("chelsea.png")]},
            {"messages": [{"role": "user", "content": "<image>Who?<image>"},
                          {"role": "assistant", "content": "Footballers."}],
             "images": [demo_image("1.jpg"), demo_image("2.jpg")]},
            {"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "Paris."}], "images": []},
        ]
        return [encode_example(proc, tokenizer, FAMILIES[self.model_type], ex, 512, info)
                for ex in examples]


class TestMllamaContract(_VisionContract):
    model_type = "mllama"


class TestQwen2VLContract(_VisionContract):
    model_type = "qwen2_vl"


class TestQwen25VLContract(_VisionContract):
    model_type = "qwen2_5_vl"


class TestMolmo2Contract(_VisionContract):
    model_type = "molmo2"
