"""plugtune-falcon: Falcon (multi-query, new decoder architecture) and legacy RefinedWeb.

Family quirks handled here, composed from :mod:`plugtune.modeling` (helpers beside this file):

* legacy ``RefinedWeb`` / ``RefinedWebModel`` checkpoints load into the native
  ``FalconForCausalLM`` without remote code (:mod:`plugtune_falcon._legacy`); core routes them
  here from ``config.json``'s ``model_type`` even though transformers cannot build the config;
* 4-bit / 8-bit loading actually quantizes Falcon (``FalconLinear`` is invisible to
  transformers' bitsandbytes integration; :mod:`plugtune_falcon._kbit`);
* 8-bit training works: Falcon adds into the MLP output in place, which autograd refuses for
  bitsandbytes' 8-bit outputs (views made in a custom Function), so those outputs are cloned;
* multi-query (7B) and new-decoder-architecture (40B/180B) configs need nothing else: both keep
  the fused ``query_key_value`` projection, the LoRA target of ``auto``;
* the Falcon tokenizer has no pad, unk or BOS: pad = EOS (``<|endoftext|>``), which stays a
  trained label because plugtune's collator pads labels with -100 from the features.
"""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family, Loaded
from plugtune_falcon._legacy import LEGACY_TYPES, falcon_config_from_legacy

FAMILIES = [Family("falcon", ("falcon", *LEGACY_TYPES), "causal",
                   "Falcon 7B/40B/180B incl. legacy RefinedWeb checkpoints")]

#: ``lora_target_modules: auto`` (peft's row for falcon): the fused attention input projection.
AUTO_TARGETS = ("query_key_value",)


def _ours(spec) -> bool:
    return spec.family in FAMILIES


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Tokenizer (pad = EOS, right padding) + native ``FalconForCausalLM``.

    Legacy ``RefinedWeb*`` folders get a ``FalconConfig`` translated from their ``config.json``
    (``spec.hf_config`` is ``None`` for them); 4/8-bit loads use
    :class:`plugtune_falcon._kbit.KbitFalconForCausalLM` so the layers are really quantized.

    Raises:
        plugtune.modeling.ModelLoadError: unreadable legacy config or weights.
    """
    from plugtune.modeling import load_model, load_tokenizer

    if not _ours(spec):
        return None
    from transformers import FalconForCausalLM

    from plugtune_falcon._kbit import KbitFalconForCausalLM, clone_8bit_mlp_outputs

    tok = load_tokenizer(spec, padding_side="right")
    kwargs = {}
    if spec.model_type in LEGACY_TYPES:
        kwargs["config"] = falcon_config_from_legacy(spec.path)
    cls = KbitFalconForCausalLM if spec.quantization else FalconForCausalLM
    model = load_model(spec, auto_class=cls, **kwargs)
    if spec.quantization == "8bit":
        clone_8bit_mlp_outputs(model)
    return Loaded(model=model, tokenizer=tok)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` -> ``query_key_value``; ``all-linear`` -> ``query_key_value``, ``dense``,
    ``dense_h_to_4h``, ``dense_4h_to_h`` (never ``lm_head``); explicit names are checked.

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
    """Right-padded batches; packed rows keep their position ids (Falcon's rotary and ALiBi
    variants both honour transformers' packed-sequence mask)."""
    from plugtune.data.collate import Collator

    if not _ours(spec):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Collator(pad_token_id=pad, padding_side="right")


@hookimpl
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    from plugtune.modeling import loss_from_batch

    if not _ours(spec):
        return None
    return loss_from_batch(model, batch, num_items_in_batch, use_cache=False)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Left-padded batched generation stopping on ``<|endoftext|>`` (and a template's end-of-turn)."""
    from plugtune.modeling import generate_causal

    if not _ours(spec):
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample, **kwargs)
