"""plugtune-llama: Llama 2 / 3.x, Qwen2 / Qwen2.5 and BLOOM / BLOOMZ (hook impls only).

Family quirks handled here, composed from :mod:`plugtune.modeling` (helpers beside this file):

* pad token: a dedicated pad from the vocabulary when the tokenizer has none or pads with a stop
  token (Llama 3.1+ ``<|finetune_right_pad_id|>``, Llama 2 ``<unk>``, BLOOM ``<pad>``); labels
  stay -100-padded from the features, so EOS is always learned (:mod:`plugtune_llama._tokens`);
* right padding for training (collate), left padding for batched generation;
* Llama 3.x / Qwen2.5 stop tokens the official generation configs list besides the template's
  end-of-turn (``<|eom_id|>``, ``<|end_of_text|>``, ``<|endoftext|>``);
* BLOOM: eager attention (no sdpa in transformers), packed rows unpacked because ALiBi ignores
  ``position_ids``, fused ``query_key_value`` targets (:mod:`plugtune_llama._bloom`);
* LoRA targets: each family's row of peft's table for ``auto``; ``all-linear`` = every Linear
  but ``lm_head``; explicit names checked against the model.
"""

from __future__ import annotations

import logging

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

log = logging.getLogger(__name__)

FAMILIES = [
    Family("llama", ("llama",), "causal", "Llama 2 / Llama 3.x"),
    Family("qwen2", ("qwen2",), "causal", "Qwen2 / Qwen2.5"),
    # ALiBi + a mask built without position_ids: packed rows would leak across samples, so
    # the UnpackingCollator (_bloom.py) splits them back into one row per sample: exact
    Family("bloom", ("bloom",), "causal", "BLOOM / BLOOMZ (fused query_key_value)",
           packing="exact"),
]

#: ``lora_target_modules: auto`` per family (this plugin's rows of peft's
#: ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``).
AUTO_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "bloom": ("query_key_value",),  # = plugtune_llama._bloom.AUTO_TARGETS (not imported: no torch)
}


def family_of(spec) -> str | None:
    """This plugin's family name for ``spec``, or ``None`` when another plugin owns it."""
    return spec.family.name if spec.family in FAMILIES else None


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Tokenizer (family pad, right padding) + model (BLOOM: eager attention).

    Raises:
        ModelLoadError: a BLOOM recipe asks for ``attn_implementation`` other than ``eager``.
    """
    from plugtune.modeling import ModelLoadError, load_model, load_tokenizer
    from plugtune_llama._tokens import set_family_pad

    fam = family_of(spec)
    if fam is None:
        return None
    tok = load_tokenizer(spec, padding_side="right")
    set_family_pad(tok, fam)
    kwargs = {}
    if fam == "bloom":
        asked = spec.recipe.attn_implementation
        if asked not in (None, "eager"):
            raise ModelLoadError(
                f"{spec.path}: attn_implementation: {asked!r} is not supported by BLOOM in "
                "transformers (only 'eager'); remove the key")
        if spec.recipe.flash_attention:
            log.warning("flash_attention: true is ignored for BLOOM (eager attention only)")
        kwargs["attn_implementation"] = "eager"
    model = load_model(spec, **kwargs)
    return Loaded(model=model, tokenizer=tok)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` -> :data:`AUTO_TARGETS`; ``all-linear`` -> every Linear leaf name except the
    output head (embeddings are not Linear); explicit names are checked against the model.

    Raises:
        ValueError: an explicit name is absent or not a LoRA-wrappable layer (e.g. BLOOM's
            ``mlp``); the message lists the model's Linear names.
    """
    from plugtune.modeling import check_target_modules, linear_module_names

    fam = family_of(spec)
    if fam is None:
        return None
    if method == "auto":
        targets = list(AUTO_TARGETS[fam])
    elif method == "all-linear":
        return linear_module_names(model)
    else:
        targets = [method] if isinstance(method, str) else list(method)
    check_target_modules(model, targets)
    return targets


@hookimpl
def plugtune_collate(spec, tokenizer):
    """Right-padded batches; BLOOM unpacks packed rows (ALiBi has no position ids)."""
    from plugtune.data.collate import Collator
    from plugtune_llama import _bloom

    fam = family_of(spec)
    if fam is None:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cls = _bloom.UnpackingCollator if fam == "bloom" else Collator
    return cls(pad_token_id=pad, padding_side="right")


@hookimpl
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    """The model's token loss with ``use_cache=False`` (packed rows need it)."""
    from plugtune.modeling import loss_from_batch

    if family_of(spec) is None:
        return None
    return loss_from_batch(model, batch, num_items_in_batch, use_cache=False)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Left-padded batched generation stopping on EOS, the template's end-of-turn token and the
    family's extra stop tokens (:data:`plugtune_llama._tokens.STOP_TOKENS`)."""
    from plugtune.modeling import generate_causal
    from plugtune_llama._tokens import STOP_TOKENS

    fam = family_of(spec)
    if fam is None:
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample,
                           extra_stop_tokens=STOP_TOKENS[fam], **kwargs)
