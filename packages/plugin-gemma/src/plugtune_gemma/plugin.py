"""plugtune-gemma: Gemma, Gemma 2, Gemma 3 (text) and Gemma 4 (text) (hook impls only).

Family quirks, and where each is handled (most by core, checked here by tests on the real
Gemma 3 tokenizer and tiny models built from transformers' config classes):

* ``<bos>`` exactly once: the chat template emits ``{{ bos_token }}`` *and* the tokenizer adds
  one; core's :func:`plugtune.data.tokenize.one_bos` strips what the text starts with and puts
  one back (training rows), :func:`plugtune.modeling.generate_causal` tokenizes a prompt that
  already starts with ``<bos>`` without special tokens (generation);
* turns ``<start_of_turn>user`` / ``<start_of_turn>model`` closed by ``<end_of_turn>``: trained
  labels end at ``<end_of_turn>`` (the newline after it is not trained); generation stops on
  ``<end_of_turn>`` and on ``<eos>`` (:data:`STOP_TOKENS`: the instruction-tuned tokenizers
  name ``<end_of_turn>`` as their EOS, the official generation configs list both); the system
  prompt is folded into the first user turn by the template itself (Gemma has no system role);
* final-logit soft-capping (Gemma 2 ``30.0``; any non-``None``
  ``config.final_logit_softcapping``): core's label-only loss applies the same
  ``cap * tanh(logits / cap)`` as the model's forward (:func:`plugtune.modeling.head_forward`);
* attention soft-capping (Gemma 2 ``attn_logit_softcapping``): transformers 5.25's Gemma 2
  declares no sdpa support (``sdpa does not support softcapping``) and refuses
  ``attn_implementation="sdpa"``, so Gemma 2 loads with ``eager`` (or ``flash_attention_2`` when
  asked for and usable); Gemma 3 / 4 text never pass a soft cap to their attention in 5.25, so
  they keep core's ``sdpa``;
* sliding / global layer mix: packed rows (position ids restarting per sample, ``use_cache=False``)
  give each sample the logits it has alone even when the sliding window is shorter than the row,
  measured for Gemma 2 / 3 / 4 text: packing is exact;
* ``sqrt(hidden_size)`` embedding scaling and tied input / output embeddings: inside the model
  (``Gemma*ScaledWordEmbedding``), untouched by LoRA on the attention / MLP projections; merge
  is checked against the adapter.

Everything else (tokenizer, collate, train step, ``all-linear`` and explicit LoRA targets) is
core's generic causal-LM route: this plugin answers only where Gemma differs.
"""

from __future__ import annotations

import logging

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

log = logging.getLogger(__name__)

_TESTS = "packages/plugin-gemma/tests/"
_COMMON_QUIRKS = (
    "<bos> exactly once (template emits it, tokenizer would add another)",
    "labels end at <end_of_turn>; generation stops on <end_of_turn> and <eos>",
    "system prompt folded into the first user turn (by the template)",
)
_COMMON_TESTS = (
    _TESTS + "test_gemma_tokens.py::test_every_row_starts_with_exactly_one_bos",
    _TESTS + "test_gemma_tokens.py::test_labels_end_at_end_of_turn_per_trained_turn",
    _TESTS + "test_gemma_tokens.py::test_generation_stops_at_end_of_turn_and_eos",
)
_SOFTCAP_QUIRK = "final-logit softcap applied in the label-only loss"
_SOFTCAP_TEST = _TESTS + "test_gemma_models.py::test_label_only_loss_applies_the_softcap"
_PACKING_TEST = _TESTS + "test_gemma_models.py::test_packed_logits_equal_alone_with_a_binding_sliding_window"
_MERGE_TEST = _TESTS + "test_gemma_train.py::test_gemma3_text_trains_packed_and_merges"

FAMILIES = [
    Family("gemma", ("gemma",), "causal", "Gemma (1)",
           quirks=(*_COMMON_QUIRKS, "sqrt(hidden) embedding scale + tied embeddings through merge"),
           packing="exact", tests=(*_COMMON_TESTS,)),
    Family("gemma2", ("gemma2",), "causal", "Gemma 2 (soft-capped attention and logits)",
           quirks=(*_COMMON_QUIRKS, _SOFTCAP_QUIRK,
                   "attention softcap: eager (transformers refuses sdpa for Gemma 2)",
                   "sliding/global layer mix: packing exact"),
           packing="exact", attn_implementation="eager",
           tests=(*_COMMON_TESTS, _SOFTCAP_TEST, _PACKING_TEST,
                  _TESTS + "test_gemma_models.py::test_gemma2_loads_with_eager_attention")),
    Family("gemma3_text", ("gemma3_text",), "causal", "Gemma 3 (text-only checkpoints, 1B)",
           quirks=(*_COMMON_QUIRKS, _SOFTCAP_QUIRK, "sliding/global layer mix: packing exact",
                   "sqrt(hidden) embedding scale + tied embeddings through merge"),
           packing="exact",
           tests=(*_COMMON_TESTS, _SOFTCAP_TEST, _PACKING_TEST, _MERGE_TEST)),
    Family("gemma4_text", ("gemma4_text",), "causal", "Gemma 4 (text decoder)",
           quirks=(*_COMMON_QUIRKS, _SOFTCAP_QUIRK, "sliding/global layer mix: packing exact",
                   "auto LoRA targets q_proj, v_proj (peft has no gemma4_text row)"),
           packing="exact", tests=(*_COMMON_TESTS, _SOFTCAP_TEST, _PACKING_TEST)),
]

#: ``lora_target_modules: auto``: peft's row for gemma / gemma2 / gemma3_text, which Gemma 4 text
#: (same attention projection names, no row in peft 0.22) shares
AUTO_TARGETS = ("q_proj", "v_proj")

#: stop tokens besides the template's end of turn: Gemma's generation configs list ``<eos>``
#: (id 1) and ``<end_of_turn>`` (id 106); the -it tokenizers name only ``<end_of_turn>`` as EOS
STOP_TOKENS = ("<end_of_turn>", "<eos>")

#: attention implementations Gemma 2 runs with its attention soft cap (transformers 5.25:
#: ``Gemma2PreTrainedModel._supports_sdpa = False``)
GEMMA2_ATTENTION = ("eager", "flash_attention_2")


def family_of(spec) -> str | None:
    """This plugin's family name for ``spec``, or ``None`` when another plugin owns it."""
    return spec.family.name if spec.family in FAMILIES else None


@hookimpl
def plugtune_families():
    return FAMILIES


def attention_for(spec) -> str | None:
    """The ``attn_implementation`` to load ``spec`` with: core's choice, except that Gemma 2
    gets ``eager`` (one notice) where core would use ``sdpa``, which transformers refuses for
    it. ``None`` = core's choice unchanged (Gemma 1 / 3 / 4 text)."""
    from plugtune.modeling import attn_implementation

    if family_of(spec) != "gemma2":
        return None
    impl = attn_implementation(spec)
    if impl in GEMMA2_ATTENTION:
        return impl
    if spec.recipe.attn_implementation:
        log.warning("attn_implementation: %r is not supported by Gemma 2 in transformers (its "
                    "attention soft cap needs one of %s); using eager",
                    spec.recipe.attn_implementation, ", ".join(GEMMA2_ATTENTION))
    else:
        log.info("Gemma 2: eager attention (transformers has no sdpa with attention soft-capping)")
    return "eager"


@hookimpl
def plugtune_load(spec):
    """Core's tokenizer and model; Gemma 2 with :func:`attention_for`'s implementation."""
    from plugtune.modeling import load_model, load_tokenizer

    if family_of(spec) is None:
        return None
    impl = attention_for(spec)
    model = load_model(spec, **({"attn_implementation": impl} if impl else {}))
    return Loaded(model=model, tokenizer=load_tokenizer(spec, padding_side="right"))


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` -> :data:`AUTO_TARGETS` (checked against the model); ``all-linear`` and explicit
    names pass to core's generic route.

    Raises:
        ValueError: the model has no ``q_proj`` / ``v_proj`` (message lists its Linear names).
    """
    from plugtune.modeling import check_target_modules

    if family_of(spec) is None or method != "auto":
        return None
    check_target_modules(model, AUTO_TARGETS)
    return list(AUTO_TARGETS)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Core's batched generation, stopping on :data:`STOP_TOKENS` as well."""
    from plugtune.modeling import generate_causal

    if family_of(spec) is None:
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample,
                           extra_stop_tokens=STOP_TOKENS, **kwargs)
