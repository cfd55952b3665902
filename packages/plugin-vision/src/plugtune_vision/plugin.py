"""plugtune-vision: Llama 3.2 Vision (mllama), Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Gemma 3,
SmolVLM / Idefics3, Molmo, and the generic image-text route (``image_text``: any
``AutoModelForImageTextToText`` no family claims, e.g. LLaVA).

Hook implementations only; the work is in the private modules beside this one:
``_processors`` (family facts, processor loading), ``_encode`` (image-token expansion, label
masks, length policy), ``_collate`` (pixels through each image processor), ``_targets`` (LoRA
on the language model only) and ``_generate`` (generation with images).

Original Molmo checkpoints (``model_type: molmo``) are not in transformers: their code comes
from the checkpoint (remote code) and loads only when the recipe sets
``trust_remote_code: true``.
"""

from __future__ import annotations

import re

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

_T = "packages/plugin-vision/tests/"
_ROWS = _T + "test_vlm_table.py::"
_NOT_PACKED = ("image rows are never packed: core packs text tasks only (image positions, "
               "M-RoPE grids and image attention masks are per row)")
_COMMON = ("image tokens and prompt masked with -100", "LoRA on the language model only; vision "
           "tower frozen for full fine-tuning")
_NO_TV = "image-only processor when torchvision is missing"
FAMILIES = [
    Family("mllama", ("mllama",), "vision", "Llama 3.2 Vision (cross-attention adapters)",
           quirks=(*_COMMON, "<|image|> + cross-attention mask per tile; cross-attention "
                   "layers LoRA opt-in"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_T + "test_encode_collate.py::test_mixed_text_only_and_multi_image_batch",)),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), "vision",
           "Qwen2-VL / Qwen2.5-VL / Qwen3-VL",
           quirks=(*_COMMON, _NO_TV, "<|image_pad|> x grid_t*grid_h*grid_w/merge^2 per image",
                   "mm_token_type_ids for M-RoPE"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_ROWS + "test_encode_masks_labels", _ROWS + "test_lora_trains_and_stops")),
    Family("gemma3", ("gemma3",), "vision", "Gemma 3 (image-text)",
           quirks=(*_COMMON, "<bos> once; <start_of_turn>model / <end_of_turn>",
                   "<start_of_image> + mm_tokens_per_image soft tokens + <end_of_image>",
                   "token_type_ids: bidirectional attention inside each image"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_ROWS + "test_encode_masks_labels", _ROWS + "test_lora_trains_and_stops")),
    Family("idefics3", ("smolvlm", "idefics3"), "vision", "SmolVLM / Idefics3",
           quirks=(*_COMMON, _NO_TV, "image split into rows x cols tiles + global view, "
                   "<fake_token_around_image><row_r_col_c> tags", "no num2words needed",
                   "a list-content-only chat template gets string content as parts"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_ROWS + "test_encode_masks_labels", _ROWS + "test_lora_trains_and_stops",
                  _ROWS + "test_a_parts_only_chat_template_renders_string_content_as_parts")),
    Family("molmo", ("molmo2", "molmo"), "vision",
           "Molmo 2 (native); original Molmo via remote code (trust_remote_code: true)",
           quirks=(*_COMMON, _NO_TV, "mm_token_type_ids required for training"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_T + "test_encode_collate.py::test_mixed_text_only_and_multi_image_batch",)),
    Family("image_text", ("image_text",), "vision",
           "generic image-text route: any AutoModelForImageTextToText + AutoProcessor no family "
           "claims (the processor's chat template and image token)",
           quirks=("placeholder = what the processor's chat template renders for an image, "
                   "else its image_token", "expansion by the processor's replace_image_token",
                   "image tokens and prompt masked with -100"),
           packing="refused", packing_reason=_NOT_PACKED,
           tests=(_ROWS + "test_generic_route_trains",)),
]
_OURS = {mt for f in FAMILIES for mt in f.model_types}
REMOTE_MOLMO = "molmo"
GENERIC = "image_text"
#: parameter names of the vision encoders, frozen for full fine-tuning; the projectors
#: (``multi_modal_projector``, Qwen-VL's ``visual.merger`` / ``visual.deepstack_merger_list``,
#: Idefics3's ``connector``) stay trainable
VISION_TOWER = re.compile(
    r"(^|\.)(vision_model|vision_tower|visual|vision_backbone)\.(?!merger\.|deepstack_merger_list\.)")


def _ours(spec) -> bool:
    return spec.model_type in _OURS or spec.family.name == GENERIC


def _real_type(spec) -> str:
    """The checkpoint's own ``config.model_type`` on the generic route (where
    ``spec.model_type`` is ``image_text``); it selects the :data:`._processors.FAMILIES` row,
    if any. ``image_text`` when unknown (the facts then come from the processor)."""
    if spec.family.name != GENERIC:
        return spec.model_type
    return getattr(spec.hf_config, "model_type", None) or spec.model_type


def _facts(spec, processor):
    from plugtune_vision._processors import family_for

    return family_for(_real_type(spec), processor)


def _remote_molmo_error(what: str) -> ModelLoadError:  # noqa: F821 (imported lazily)
    from plugtune.modeling import ModelLoadError

    return ModelLoadError(
        f"{what} of original Molmo checkpoints (model_type 'molmo', remote code) is not "
        "supported: their processor (processor.process / model.generate_from_batch) has no "
        "chat-template and label API for plugtune to drive. Use a Molmo2 checkpoint "
        "(native Molmo2ForConditionalGeneration) for fine-tuning.")


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Model (``AutoModelForImageTextToText``), tokenizer and processor.

    The tokenizer is the processor's (one object: chat template and added tokens stay in
    sync). A pad token is set (Llama 3.2's ``<|finetune_right_pad_id|>`` when present). For
    full fine-tuning (``adapter: none``) the vision encoder is frozen; the projector and the
    language model train.

    Raises:
        ModelLoadError: original Molmo without ``trust_remote_code: true``; unloadable files.
    """
    from plugtune.modeling import ModelLoadError, load_model
    from plugtune_vision._processors import chat_template_for_strings, family_for, load_processor

    if not _ours(spec):
        return None
    src = spec.recipe.tokenizer or spec.path
    if spec.model_type == REMOTE_MOLMO:
        if not spec.trust_remote_code:
            raise ModelLoadError(
                f"{spec.path}: original Molmo checkpoints (model_type 'molmo') run code shipped "
                "with the checkpoint; set trust_remote_code: true in the recipe if you trust it, "
                "or use a Molmo2 checkpoint (native in transformers, no remote code)")
        from transformers import AutoModelForCausalLM, AutoProcessor

        processor = AutoProcessor.from_pretrained(src, trust_remote_code=True,
                                                  revision=spec.recipe.revision)
        model = load_model(spec, auto_class=AutoModelForCausalLM)
        return Loaded(model=model, tokenizer=processor.tokenizer, processor=processor)
    from transformers import AutoModelForImageTextToText

    if spec.family.name == GENERIC and spec.model_type == GENERIC:
        # recipe override (model_type: image_text); the automatic route already said it
        import logging

        logging.getLogger(__name__).warning(
            "plugtune: %s (model_type %s) goes through the generic image-text route: "
            "AutoModelForImageTextToText + AutoProcessor, the processor's chat template and "
            "image token", spec.path, _real_type(spec))
    processor = load_processor(src, _real_type(spec), spec.recipe.revision)
    tok = processor.tokenizer
    if not getattr(tok, "chat_template", None) and getattr(processor, "chat_template", None):
        tok.chat_template = processor.chat_template
    fam = family_for(_real_type(spec), processor)  # before any change to the template
    notice = chat_template_for_strings(processor, tok, fam.placeholder)
    if notice:
        import logging

        logging.getLogger(__name__).warning("plugtune: %s: %s", spec.path, notice)
    if tok.pad_token is None:
        if "<|finetune_right_pad_id|>" in tok.get_vocab():
            tok.pad_token = "<|finetune_right_pad_id|>"
        else:
            from plugtune.modeling import ensure_pad_token

            ensure_pad_token(tok)
    tok.padding_side = "right"
    model = load_model(spec, auto_class=AutoModelForImageTextToText)
    if spec.recipe.adapter == "none":
        for name, p in model.named_parameters():
            if VISION_TOWER.search(name):
                p.requires_grad_(False)
    return Loaded(model=model, tokenizer=tok, processor=processor)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """A regex over the language model's Linear modules (see :mod:`._targets`)."""
    if not _ours(spec):
        return None
    from plugtune_vision._targets import targets_for

    return targets_for(model, method, spec.recipe.lora_target_cross_attention)


@hookimpl
def plugtune_encode(spec, processor, tokenizer, example, max_len, template):
    """Expand images, mask prompt and image tokens, apply the image-safe length policy."""
    if not _ours(spec):
        return None
    if spec.model_type == REMOTE_MOLMO:
        raise _remote_molmo_error("training")
    from plugtune_vision._encode import encode_example

    rec = spec.recipe
    return encode_example(processor, tokenizer, _facts(spec, processor), example, max_len,
                          template, rec.train_on_inputs, rec.truncation)


@hookimpl
def plugtune_collate(spec, tokenizer, processor):
    """:class:`~plugtune_vision._collate.VisionCollator` for the family (picklable)."""
    if not _ours(spec):
        return None
    if spec.model_type == REMOTE_MOLMO:
        raise _remote_molmo_error("training")
    if processor is None:
        raise ValueError(f"{spec.model_type}: collation needs the processor (Loaded.processor)")
    from plugtune_vision._collate import VisionCollator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fam = _facts(spec, processor)
    return VisionCollator(processor, pad, mode=fam.collate, token_types_key=fam.token_types_key)


@hookimpl
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    """The model's own loss; ``num_items_in_batch`` only for models that accept it (Molmo2's
    loss filters logits itself and sets ``accepts_loss_kwargs = False``)."""
    from plugtune.modeling import loss_from_batch

    if not _ours(spec):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = num_items_in_batch if getattr(base, "accepts_loss_kwargs", True) else None
    return loss_from_batch(model, batch, n)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens, images, processor):
    """Greedy completions; ``images`` per prompt (see :func:`._generate.images_per_prompt`)."""
    if not _ours(spec):
        return None
    if spec.model_type == REMOTE_MOLMO:
        raise _remote_molmo_error("generation")
    if processor is None:
        raise ValueError(f"{spec.model_type}: generation needs the processor (Loaded.processor)")
    from plugtune.data.templates import ensure_chat_template
    from plugtune_vision._generate import generate_with_images

    if not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer, spec.recipe.chat_template)
    return generate_with_images(model, processor, tokenizer, _facts(spec, processor), prompts,
                                images, max_new_tokens)
