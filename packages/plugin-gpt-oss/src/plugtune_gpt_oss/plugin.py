"""plugtune-gpt-oss: OpenAI gpt-oss (``model_type: gpt_oss``), hook implementations only.

Quirks handled (helpers beside this file):

* attention: ``eager`` (gpt-oss's attention sinks are not in sdpa: transformers refuses
  ``sdpa``); a recipe's ``flex_attention`` or ``kernels-community/...`` kernel is kept, and
  ``flash_attention: true`` becomes the vllm-flash-attn3 hub kernel on CUDA when ``kernels`` is
  installed (:mod:`plugtune_gpt_oss._load`);
* MXFP4 checkpoints: dequantized to bf16 at load (``Mxfp4Config(dequantize=True)``), one line;
* packing: transformers builds gpt-oss's masks without ``position_ids``; core's
  :func:`plugtune.architectures.install_packed_masks` (installed by ``load_model`` for packed
  runs, on any route) builds them from the position ids (packed == unpacked, tested here);
* the harmony chat format (``<|start|>role<|channel|>analysis|final<|message|>...<|end|>``),
  installed when the tokenizer ships no template; data reasoning (``reasoning_content`` /
  ``thinking``) goes to the ``analysis`` channel; each earlier trained turn gets a row that ends
  with it (``plugtune_chat_rows``); the recipe key
  ``reasoning_effort: low|medium|high`` sets ``Reasoning:`` in the system message
  (:mod:`plugtune_gpt_oss.harmony`);
* the last turn's answer ends with ``<|return|>`` (``<|end|>`` in a history); generation stops
  on ``<|return|>`` / ``<|call|>`` and returns the ``final`` channel's text (not the reasoning);
* LoRA targets: the attention projections (``q_proj k_proj v_proj o_proj``) for ``auto`` and
  ``all-linear``: the experts are 3-D parameters and the router is not an ``nn.Linear``, so
  neither is a default target (experts are opt-in through core's MoE options).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

log = logging.getLogger(__name__)

_TESTS = "packages/plugin-gpt-oss/tests/"
FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    task="causal",
    description="OpenAI gpt-oss (harmony format, attention sinks, MXFP4 experts)",
    quirks=(
        "eager attention (sinks are not in sdpa); flash_attention -> vllm-flash-attn3 kernel on CUDA",
        "MXFP4 checkpoints dequantized to bf16 for training",
        "packed rows: masks built from position_ids (transformers' gpt-oss ignores them)",
        "harmony chat template (analysis/final channels, earlier reasoning dropped)",
        "reasoning_effort recipe key; stops on <|return|> <|call|>, answers = the final channel",
        "LoRA auto/all-linear = attention projections (experts opt-in, router frozen)",
    ),
    packing="exact",
    attn_implementation="eager",
    tests=(
        _TESTS + "test_gpt_oss.py::test_packed_logits_equal_each_sample_alone",
        _TESTS + "test_gpt_oss.py::test_lora_trains_two_steps_through_plugtune_train",
        _TESTS + "test_gpt_oss.py::test_attention_choice",
        _TESTS + "test_gpt_oss.py::test_mxfp4_config_is_dequantized_to_bf16",
        _TESTS + "test_gpt_oss.py::test_mxfp4_checkpoint_loads_dequantized_and_trains",
        _TESTS + "test_harmony.py::test_trained_labels_are_what_the_template_renders",
        _TESTS + "test_harmony.py::test_every_turn_is_trained_as_when_it_is_generated",
        _TESTS + "test_harmony.py::test_generate_returns_the_final_channel",
        _TESTS + "test_harmony.py::test_generation_stops_at_harmony_end_tokens",
    ),
)
FAMILIES = [FAMILY]

#: LoRA targets for ``auto`` and ``all-linear``: every ``nn.Linear`` of a gpt-oss decoder layer
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class GptOssKeys(BaseModel):
    """Recipe keys of the gpt-oss plugin."""

    model_config = ConfigDict(extra="forbid")

    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="gpt-oss: 'Reasoning: <effort>' in the harmony system message "
        "(default medium); applies to plugtune's harmony template")
    harmony_template: bool = Field(
        False, description="gpt-oss: use plugtune's harmony template even when the tokenizer "
        "ships one (the checkpoint's own ends the last turn with <|return|>, which is not "
        "prefix-stable for multi-turn label masking)")


def _mine(spec) -> bool:
    return spec.family == FAMILY


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_recipe_keys():
    return [GptOssKeys]


@hookimpl
def plugtune_load(spec):
    """Tokenizer (harmony template when it has none, harmony special tokens) + model (eager or a
    supported kernel; MXFP4 dequantized to bf16); the model's generation config stops on the
    harmony end tokens.

    Raises:
        plugtune.modeling.ModelLoadError: the tokenizer or model cannot be loaded, or an MXFP4
            checkpoint is combined with ``load_in_4bit`` / ``load_in_8bit``.
    """
    from plugtune.modeling import load_model, load_tokenizer
    from plugtune_gpt_oss import _load, harmony

    if not _mine(spec):
        return None
    rec = spec.recipe
    tok = load_tokenizer(spec, padding_side="right")
    if rec.chat_template is None:
        harmony.install_template(tok, getattr(rec, "reasoning_effort", None),
                                 force=bool(getattr(rec, "harmony_template", False)))
    kwargs, notes = _load.load_kwargs(spec)
    for level, note in notes:
        log.log(level, note)
    # the recipe as load_model should read it: the attention implementation chosen here (so
    # core's flash/sdpa policy neither overrides it nor prints a second notice)
    plain = spec.replace(recipe=rec.model_copy(update={
        "flash_attention": False, "attn_implementation": kwargs.pop("attn_implementation")}))
    model = load_model(plain, **kwargs)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    harmony.set_generation_stops(model, tok)
    return Loaded(model=model, tokenizer=tok)


@hookimpl
def plugtune_target_modules(spec, model, method):
    """``auto`` / ``all-linear`` -> :data:`ATTENTION_TARGETS`; explicit names are checked.

    Raises:
        ValueError: an explicit name is absent or not a layer LoRA can wrap (``mlp`` returns a
            tuple, ``experts`` / ``router`` hold raw parameters); the message lists the Linears.
    """
    from plugtune.modeling import check_target_modules

    if not _mine(spec):
        return None
    targets = list(ATTENTION_TARGETS) if method in ("auto", "all-linear") else (
        [method] if isinstance(method, str) else list(method))
    check_target_modules(model, targets)
    return targets


@hookimpl(optionalhook=True)  # core's hook since the qwen3 merge; unknown to older cores
def plugtune_chat_rows(spec, tokenizer):
    """:class:`plugtune_gpt_oss.harmony.HarmonyRows`: each trained turn before the last is
    trained in a row of its own that ends with it (harmony renders a turn differently in a
    history: no reasoning, ``<|end|>`` instead of ``<|return|>``)."""
    from plugtune_gpt_oss.harmony import HarmonyRows

    return HarmonyRows() if _mine(spec) else None


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    """Left-padded batched generation stopping on EOS and the harmony end tokens
    (:data:`plugtune_gpt_oss.harmony.STOP_TOKENS`); each completion is the answer of the
    harmony response (:class:`plugtune_gpt_oss.harmony.FinalText`), not its reasoning."""
    from plugtune.modeling import generate_causal
    from plugtune_gpt_oss.harmony import STOP_TOKENS, final_text_parser

    if not _mine(spec):
        return None
    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample,
                           extra_stop_tokens=STOP_TOKENS, skip_special_tokens=False,
                           postprocess=final_text_parser(tokenizer), **kwargs)
