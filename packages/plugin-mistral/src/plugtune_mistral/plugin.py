"""plugtune-mistral: Mistral and Zephyr (grouped-query, sliding-window attention).

Family quirks handled here, composed from :mod:`plugtune.modeling`:

* Zephyr is a Mistral fine-tune with its own chat template: ``chat_template: zephyr`` (core's
  named template, ``<|user|>`` / ``<|assistant|>`` turns closed by ``</s>``); Mistral-Instruct's
  ``[INST]`` format is ``chat_template: mistral``;
* sliding-window attention in packed rows: transformers builds the sliding-window mask from the
  packed ``position_ids`` only with ``use_cache=False`` (a cache makes packed samples see each
  other, ../shared/FINDINGS.md), so every training/eval forward here passes ``use_cache=False``;
  a test checks packed logits against each sample alone with a window shorter than the samples;
* padding sides: flash-attn 2 cannot serve right-padded batched generation (transformers 4.x
  raised "You are attempting to perform batched generation with padding_side='right' ... for
  Flash Attention version of Mistral"; 5.x only warns and generates after the pad tokens).
  The tokenizer is therefore loaded and saved with ``padding_side="left"``, so batched
  generation with the saved run is correct everywhere, while the training collator pads on the
  right explicitly (labels padded with -100) and generation always re-pads on the left.
"""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

FAMILIES = [Family("mistral", ("mistral",), "causal", "Mistral 7B / Zephyr")]

#: ``lora_target_modules: auto`` (peft's row for mistral).
AUTO_TARGETS = ("q_proj", "v_proj")
#: padding side of the tokenizer the plugin loads (and the run directory saves)
GENERATION_PADDING_SIDE = "left"
#: padding side of training batches
TRAINING_PADDING_SIDE = "right"


def _ours(spec) -> bool:
    return spec.family in FAMILIES


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Tokenizer (pad = ``<unk>``, left padding for generation) + ``MistralForCausalLM``."""
    from plugtune.modeling import load_model, load_tokenizer

    if not _ours(spec):
        return None
    tok = load_tokenizer(spec, padding_side=GENERATION_PADDING_SIDE)
    model = load_model(spec)
    return Loaded(model=model, tokenizer=tok)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` -> ``q_proj``, ``v_proj``; ``all-linear`` -> q/k/v/o and gate/up/down projections
    (never ``lm_head``); explicit names are checked against the model.

    Raises:
        ValueError: an explicit name the model lacks (the message lists its Linear names).
    """
    from plugtune.modeling import check_target_modules, linear_module_names

    if not _ours(spec):
        return None
    if method == "all-linear":
        return linear_module_names(model)
    targets = list(AUTO_TARGETS) if method == "auto" else (
        [method] if isinstance(method, str) else list(method))
    check_target_modules(model, targets)
    return targets


@hookimpl
def plugtune_collate(spec, tokenizer):
    """Right-padded training batches whatever the tokenizer's own padding side."""
    from plugtune.data.collate import Collator

    if not _ours(spec):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Collator(pad_token_id=pad, padding_side=TRAINING_PADDING_SIDE)


@hookimpl
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    """Token loss with ``use_cache=False``: the sliding-window mask of packed rows needs it."""
    from plugtune.modeling import loss_from_batch

    if not _ours(spec):
        return None
    return loss_from_batch(model, batch, num_items_in_batch, use_cache=False)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Batched generation, always left-padded (right padding is refused: it would make
    flash-attn and sdpa continue after pad tokens), stopping on ``</s>``."""
    from plugtune.modeling import generate_causal

    if not _ours(spec):
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample, **kwargs)
