"""plugtune-phi: Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (``model_type: phi3``), hook impls only.

Phi-3-small (remote code, ``phi3small``) is not claimed.

Quirks handled (helpers in :mod:`plugtune_phi._fused`):

* fused ``qkv_proj`` / ``gate_up_proj``: Llama-style ``lora_target_modules`` (``q_proj``,
  ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) map to them with one notice; a name or
  regex that matches nothing is an error, never an adapter on nothing; ``all-linear`` lists the
  fused layers; ``auto`` is ``qkv_proj``;
* chat template: ``<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n`` (core's ``phi_3``)
  when the tokenizer ships none; the Phi-3 / Phi-4-mini templates' EOS after the last message is
  removed from the tokenizer's own template; trained turns end with ``<|end|>``;
* generation stops on ``<|end|>``, ``<|endoftext|>`` and ``<|assistant|>`` (Phi-3's generation
  config); a pad token that is one of them is replaced by ``<unk>`` when the vocabulary has it.

Not claimed: ``phimoe`` (Phi-3.5-MoE: separate ``q_proj``/``k_proj``/``v_proj``, nothing fused;
the generic route and core's MoE options serve it), ``phi4_multimodal`` (speech + vision
adapters inside the model; no plugtune data path for audio), ``phi`` (Phi-1/2: peft's own row).
"""

from __future__ import annotations

import logging

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

log = logging.getLogger(__name__)

_TESTS = "packages/plugin-phi/tests/"
FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    task="causal",
    description="Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (fused qkv_proj, gate_up_proj)",
    quirks=(
        "q_proj/k_proj/v_proj -> qkv_proj, gate_proj/up_proj -> gate_up_proj (one notice)",
        "all-linear includes qkv_proj and gate_up_proj; auto = qkv_proj",
        "<|end|>-terminated turns (own template without its trailing EOS)",
        "stops on <|end|> <|endoftext|> <|assistant|>",
    ),
    packing="auto",
    tests=(
        _TESTS + "test_phi.py::test_llama_names_map_to_fused_layers",
        _TESTS + "test_phi.py::test_all_linear_includes_the_fused_layers",
        _TESTS + "test_phi.py::test_trains_and_merge_matches_the_adapter",
        _TESTS + "test_phi.py::test_labels_end_with_end_of_turn",
        _TESTS + "test_phi.py::test_load_gives_a_template_and_a_pad_that_is_no_stop",
        _TESTS + "test_phi.py::test_generation_stops_at_end_of_turn",
    ),
)
FAMILIES = [FAMILY]
#: characters that make a ``lora_target_modules`` string a regex (peft full-matches a string)
_REGEX_CHARS = frozenset("*|()[]\\^$?+")


def _mine(spec) -> bool:
    return spec.family == FAMILY


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Tokenizer (Phi-3 template when it has none; its own without the EOS it appends after the
    last message; pad not a stop token) + model (core's loader: sdpa, dtype policy,
    quantization)."""
    from plugtune.data.templates import ensure_chat_template
    from plugtune.modeling import load_model, load_tokenizer
    from plugtune_phi import _fused

    if not _mine(spec):
        return None
    tok = load_tokenizer(spec, padding_side="right")
    if spec.recipe.chat_template is None:
        if getattr(tok, "chat_template", None):
            _fused.prefix_stable_template(tok)
        else:
            ensure_chat_template(tok, "phi_3")
    vocab = tok.get_vocab()
    stops = {vocab[t] for t in _fused.STOP_TOKENS if t in vocab}
    if tok.pad_token_id in stops and "<unk>" in vocab:
        tok.pad_token = "<unk>"
    model = load_model(spec)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return Loaded(model=model, tokenizer=tok)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` -> ``qkv_proj``; ``all-linear`` -> every Linear but the head (fused layers
    included); explicit names -> Llama-style names mapped to the fused layers (one notice),
    then checked against the model.

    Raises:
        ValueError: a name (after mapping) is absent or not a LoRA-wrappable layer, or a regex
            matches no module; the message lists the model's Linear layers.
    """
    from plugtune.modeling import check_target_modules, linear_module_names
    from plugtune_phi import _fused

    if not _mine(spec):
        return None
    if method == "all-linear":
        return linear_module_names(model)
    if method == "auto":
        targets = list(_fused.AUTO_TARGETS)
    elif isinstance(method, str) and any(c in method for c in _REGEX_CHARS):
        _fused.check_regex_targets(model, method)
        return method
    else:  # a list, one name, or LLaMA-Factory's comma-separated ``lora_target``
        names = [n.strip() for n in method.split(",")] if isinstance(method, str) else list(method)
        targets, notice = _fused.map_fused_names(names, _fused.leaf_names(model))
        if notice:
            log.warning(notice)
    check_target_modules(model, targets)
    return targets


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Left-padded batched generation stopping on :data:`plugtune_phi._fused.STOP_TOKENS`."""
    from plugtune.modeling import generate_causal
    from plugtune_phi._fused import STOP_TOKENS

    if not _mine(spec):
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample,
                           extra_stop_tokens=STOP_TOKENS, **kwargs)
