"""Tiny random-weight vision-language models with offline processors (tests, demos, recipes).

The processors pair each family's image processor (built from its class, small image sizes)
with a real tokenizer: Llama 3.2's for ``mllama`` (``<|image|>`` added, id 128256 as in Llama
3.2 Vision) and ``smolvlm`` / ``idefics3`` (their tile tags added), Qwen2.5's for ``qwen2_vl`` /
``qwen2_5_vl`` and ``llava`` (``<image>`` added), Qwen3's for ``qwen3_vl`` (the Qwen vision
tokens are already in both vocabularies), Gemma 3's for ``gemma3`` (its image tokens are in the
real vocabulary), Qwen2.5's for ``llava_next`` (``<image>`` added) and ``molmo2`` (Molmo2's
image tokens added). Model configs use those ids. ``llava`` and ``llava_next`` have no family
row: the generic ``image_text`` route serves them.

    python -m plugtune_vision.tiny qwen2_vl /tmp/tiny-qwen2-vl   # then --set base_model=...

needs ``../shared/data/tokenizers`` (or ``--tokenizer DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from plugtune_vision._processors import (
    FAMILIES,
    ImageOnlyMolmo2Processor,
    Molmo2ImageProcessorTorch,
)

TOKENIZER_OF = {"mllama": "llama3_2", "qwen2_vl": "qwen2_5", "qwen2_5_vl": "qwen2_5",
                "qwen3_vl": "qwen3", "gemma3": "gemma3", "smolvlm": "llama3_2",
                "idefics3": "llama3_2",
                "llava": "qwen2_5", "llava_next": "qwen2_5", "molmo2": "qwen2_5"}
#: a Qwen3-VL-Instruct-style ChatML template written for the tiny models: no default system
#: prompt, no reasoning block; ``{"type": "image"}`` parts render as the vision placeholder
QWEN3_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: tokens of model types without a family row (generic route)
_EXTRA = {"llava": ("<image>",), "llava_next": ("<image>",)}
#: LLaVA-NeXT's any-resolution grid of the tiny processor and config (28 px tiles)
_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def prepare_tokenizer(model_type: str, tokenizer):
    """Add the family's image tokens (and Llama 3.2's pad token) to ``tokenizer`` in place."""
    wanted = FAMILIES[model_type].extra_tokens if model_type in FAMILIES else _EXTRA[model_type]
    extra = [t for t in wanted if t not in tokenizer.get_vocab()]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    if tokenizer.pad_token is None and "<|finetune_right_pad_id|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|finetune_right_pad_id|>"
    if model_type == "qwen3_vl":  # Qwen3's text template strips <think> from earlier turns
        tokenizer.chat_template = QWEN3_VL_TEMPLATE
    return tokenizer


def tiny_processor(model_type: str, tokenizer):
    """An offline processor for ``model_type`` around ``tokenizer`` (modified in place).

    Image sizes are small so CPU steps take milliseconds: Mllama tiles of 28 px (up to 2
    tiles), Qwen2-VL 56-112 px (4-16 patches of 14 px -> 1-4 image tokens after the 2x2
    merge, more for wide images), Qwen3-VL the same with 16 px patches (64-128 px), Gemma 3
    32 px (4 patches of 8 px a side pooled to 4 soft tokens), SmolVLM images resized to 64 px
    on the long side and split into tiles of 32 px (up to 2x2 + the global view, 4 ``<image>``
    tokens each; Idefics3 the same), LLaVA 28 px (4 patches of 14 px, CLS dropped), LLaVA-NeXT 28 px tiles on a
    grid of up to 2x2 plus the base image, Molmo2 crops of 56 px (up to 2 crops).

    Raises:
        ValueError: no tiny processor for ``model_type``.
    """
    prepare_tokenizer(model_type, tokenizer)
    chat = getattr(tokenizer, "chat_template", None)
    if model_type == "mllama":
        from transformers import MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        ip = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
        return MllamaProcessor(ip, tokenizer, chat_template=chat)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from plugtune_vision._processors import IMAGE_ONLY

        ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
        return IMAGE_ONLY[model_type](image_processor=ip, tokenizer=tokenizer, chat_template=chat)
    if model_type == "qwen3_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from plugtune_vision._processors import IMAGE_ONLY

        ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=64 * 64,
                                      max_pixels=128 * 128)
        return IMAGE_ONLY[model_type](image_processor=ip, tokenizer=tokenizer, chat_template=chat)
    if model_type == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        return Gemma3Processor(ip, tokenizer, chat_template=chat, image_seq_length=4)
    if model_type == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        from plugtune_vision._processors import IMAGE_ONLY

        ip = SmolVLMImageProcessorPil(size={"longest_edge": 64},
                                      max_image_size={"longest_edge": 32})
        return IMAGE_ONLY[model_type](image_processor=ip, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=chat)
    if model_type == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil,
        )

        ip = Idefics3ImageProcessorPil(size={"longest_edge": 64},
                                       max_image_size={"longest_edge": 32})
        return Idefics3Processor(ip, tokenizer, image_seq_len=4, chat_template=chat)
    if model_type == "llava":
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        ip = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(ip, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=chat)
    if model_type == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                        crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=_PINPOINTS)
        return LlavaNextProcessor(ip, tokenizer, patch_size=14,
                                  vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=chat)
    if model_type == "molmo2":
        ip = Molmo2ImageProcessorTorch(size={"height": 56, "width": 56}, max_crops=2,
                                       overlap_margins=[1, 1])
        return ImageOnlyMolmo2Processor(image_processor=ip, tokenizer=tokenizer, chat_template=chat)
    raise ValueError(f"no tiny processor for model type {model_type!r}; "
                     f"expected one of {', '.join(TOKENIZER_OF)}")


def tiny_config(model_type: str, tokenizer):
    """A tiny config (hidden 32, 2-3 text layers, 2 vision layers) whose special-token ids
    match ``tokenizer``.

    Raises:
        ValueError: no tiny config for ``model_type``.
    """
    ids = tokenizer.convert_tokens_to_ids
    if model_type == "mllama":
        from transformers import MllamaConfig

        return MllamaConfig(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1,
                               attention_heads=2, intermediate_size=64, vision_output_dim=64,
                               image_size=28, patch_size=14, max_num_tiles=2,
                               intermediate_layers_indices=[0],
                               supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
            text_config=dict(vocab_size=128264, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                             cross_attention_layers=[1], max_position_embeddings=2048,
                             bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")]),
            image_token_index=ids("<|image|>"))
    text = dict(vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=4096)
    qwen_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"),
                    vision_end_token_id=ids("<|vision_end|>"))
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            **qwen_ids)
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                               out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
            **qwen_ids)
    if model_type == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_parameters={
                "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                "rope_theta": 5e6}),
            vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                               out_hidden_size=32, patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=16,
                               deepstack_visual_indexes=[0]),
            **qwen_ids)
    small_text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64,
                      max_position_embeddings=4096)
    if model_type == "gemma3":
        from transformers import Gemma3Config

        # the real Gemma 3 vocabulary (262208 rows) holds <image_soft_token> (262144)
        return Gemma3Config(
            text_config=dict(small_text, vocab_size=262208, sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"],
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=[tokenizer.eos_token_id, ids("<eos>")],
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8),
            mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    if model_type in ("smolvlm", "idefics3"):
        from transformers import Idefics3Config, SmolVLMConfig

        cls = SmolVLMConfig if model_type == "smolvlm" else Idefics3Config
        return cls(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8),
            text_config=dict(small_text, model_type="llama", vocab_size=len(tokenizer),
                             pad_token_id=tokenizer.pad_token_id),
            scale_factor=2, image_token_id=ids("<image>"))
    if model_type in ("llava", "llava_next"):
        from transformers import LlavaConfig, LlavaNextConfig

        common = dict(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14, projection_dim=32),
            text_config=dict(small_text, model_type="qwen2", vocab_size=len(tokenizer)),
            image_token_index=ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-1)
        if model_type == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=_PINPOINTS)
    if model_type == "molmo2":
        from transformers import Molmo2Config

        return Molmo2Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                               image_size=[56, 56], patch_size=14),
            adapter_config=dict(vision_feature_layer=[-1], hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                text_hidden_size=32),
            text_config=dict(text, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             additional_vocab_size=128),
            image_start_token_id=ids("<im_start>"),
            low_res_image_start_token_id=ids("<low_res_im_start>"),
            image_end_token_id=ids("<im_end>"), image_patch_id=ids("<im_patch>"),
            frame_start_token_id=ids("<frame_start>"), frame_end_token_id=ids("<frame_end>"))
    raise ValueError(f"no tiny config for model type {model_type!r}")


def tiny_model(model_type: str, tokenizer, seed: int = 0):
    """A random-weight ``AutoModelForImageTextToText`` from :func:`tiny_config` (fp32)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(tiny_config(model_type, tokenizer))


def save_tiny(model_type: str, path: str | Path, tokenizer, seed: int = 0) -> Path:
    """Save a tiny model and its processor to ``path`` (safetensors), for ``base_model: path``."""
    path = Path(path)
    proc = tiny_processor(model_type, tokenizer)
    model = tiny_model(model_type, proc.tokenizer, seed)
    model.save_pretrained(path, safe_serialization=True)
    proc.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plugtune_vision.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_type", choices=sorted(TOKENIZER_OF))
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: ../shared/data/tokenizers/...)")
    args = ap.parse_args(argv)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from plugtune.testing import load_shared_tokenizer

        try:
            tok = load_shared_tokenizer(TOKENIZER_OF[args.model_type])
        except BaseException as exc:  # pytest.skip when ../shared is absent
            raise SystemExit(f"no tokenizer: {exc}; pass --tokenizer DIR") from None
    out = save_tiny(args.model_type, args.out_dir, tok)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
