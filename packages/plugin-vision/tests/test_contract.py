"""The plugin contract for each vision family: tiny configs, real tokenizers, real images."""

from __future__ import annotations

from conftest import caption_image, demo_image, tokenizer_for

from plugtune.testing import PluginContract


class _VisionContract(PluginContract):
    plugin_name = "plugtune-vision"
    #: the checkpoint's model type (differs from ``model_type`` on the generic route)
    tiny_type = ""

    @property
    def _tiny(self) -> str:
        return self.tiny_type or self.model_type

    def make_tokenizer(self):
        return tokenizer_for(self._tiny)

    def make_model(self):
        from plugtune_vision.tiny import tiny_model

        return tiny_model(self._tiny, tokenizer_for(self._tiny))

    def make_processor(self, tokenizer):
        from plugtune_vision.tiny import tiny_processor

        return tiny_processor(self._tiny, tokenizer)

    def sample_features(self, spec, tokenizer) -> list[dict]:
        """An image/caption sample, a two-image chat sample and a text-only one."""
        from plugtune.data.templates import ensure_chat_template
        from plugtune.data.tokenize import probe_template
        from plugtune_vision._encode import encode_example
        from plugtune_vision._processors import family_for

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
        fam = family_for(self.model_type, proc)
        return [encode_example(proc, tokenizer, fam, ex, 512, info) for ex in examples]


class TestMllamaContract(_VisionContract):
    model_type = "mllama"


class TestQwen2VLContract(_VisionContract):
    model_type = "qwen2_vl"


class TestQwen25VLContract(_VisionContract):
    model_type = "qwen2_5_vl"


class TestMolmo2Contract(_VisionContract):
    model_type = "molmo2"


class TestQwen3VLContract(_VisionContract):
    model_type = "qwen3_vl"


class TestGemma3Contract(_VisionContract):
    model_type = "gemma3"


class TestSmolVLMContract(_VisionContract):
    model_type = "smolvlm"


class TestGenericImageTextContract(_VisionContract):
    """The generic ``image_text`` route on LLaVA (no family row: facts from its processor)."""

    model_type = "image_text"
    tiny_type = "llava"
