"""plugtune-qwen3: Qwen3, Qwen3-MoE, Qwen3.5 (text) and SmolLM3 (hook impls only).

What these families share is a hybrid-thinking chat template (``<think>...</think>``, the
``enable_thinking`` switch); everything else is core's generic causal-LM route, called through
:mod:`plugtune.modeling` or by passing (returning ``None``) so core's own handling applies:

* chat rows (:mod:`plugtune_qwen3._thinking`): every trained assistant turn is trained on what
  the template renders for it when it is the turn being generated (Qwen3 strips the reasoning of
  turns before the last user turn), reasoning read from ``reasoning_content`` or inline
  ``<think>`` and put where the template reads it; the recipe key ``enable_thinking`` trains
  with or without reasoning and becomes the default of the chat template, so generation,
  ``plugtune chat`` / ``eval`` and the saved tokenizer honour it;
* loading: core's :func:`~plugtune.modeling.load_tokenizer` / :func:`~plugtune.modeling.load_model`
  (dtype, attention, quantization); Qwen3 tokenizers pad with ``<|endoftext|>``, which is not
  their stop token ``<|im_end|>``;
* LoRA targets, collate, train step: core's generic hooks (so core's MoE rules apply to
  ``qwen3_moe``: attention projections by default, experts opt-in, router frozen);
* packing: ``auto`` (softmax attention with position-id restarts) for Qwen3 / Qwen3-MoE /
  SmolLM3; refused for Qwen3.5, whose gated-delta-rule linear-attention layers carry state from
  one packed sample into the next.

The module top imports no torch (recipe validation imports it for the ``enable_thinking`` key).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

_TESTS = "packages/plugin-qwen3/tests/"
_THINKING_QUIRKS = (
    "<think> kept only after the last user turn: each trained turn as the template renders it "
    "when generated (rows split where the template rewrites history)",
    "reasoning from reasoning_content or inline <think>, placed where the template reads it",
    "enable_thinking: false drops reasoning, empty think block in the prompt; the template "
    "default follows the recipe (generation, chat, saved tokenizer)",
)
_THINKING_TESTS = (
    _TESTS + "test_thinking.py::test_multi_turn_labels_are_what_the_template_renders",
    _TESTS + "test_thinking.py::test_enable_thinking_false_trains_answers_only",
    _TESTS + "test_thinking.py::test_generation_prompt_honours_enable_thinking",
)

FAMILIES = [
    Family("qwen3", ("qwen3",), "causal", "Qwen3 (hybrid thinking)", quirks=_THINKING_QUIRKS,
           packing="auto", tests=(*_THINKING_TESTS, _TESTS + "test_train.py::test_lora_trains[qwen3]",
                                  _TESTS + "test_train.py::test_packing_exact_or_refused[qwen3-True]")),
    Family("qwen3_moe", ("qwen3_moe",), "causal",
           "Qwen3-MoE (hybrid thinking; MoE targets and router loss from core)",
           quirks=(*_THINKING_QUIRKS, "MoE: core's generic targets / router handling"),
           packing="auto", tests=(*_THINKING_TESTS, _TESTS + "test_train.py::test_lora_trains[qwen3_moe]")),
    Family("qwen3_5", ("qwen3_5_text",), "causal",
           "Qwen3.5 text (hybrid thinking; gated-delta-rule linear attention)",
           quirks=(*_THINKING_QUIRKS, "packing refused: linear-attention layers"),
           packing="refused",
           packing_reason=(
               "Qwen3.5's linear-attention (gated delta rule) layers carry their state from one "
               "packed sample into the next, which position-id restarts do not reset (a tiny "
               "qwen3_5_text: |logit difference| 5.6e-2 packed vs alone)"),
           tests=(*_THINKING_TESTS, _TESTS + "test_train.py::test_lora_trains[qwen3_5_text]",
                  _TESTS + "test_train.py::test_packing_exact_or_refused[qwen3_5_text-False]")),
    Family("smollm3", ("smollm3",), "causal", "SmolLM3 (hybrid thinking, /think and /no_think)",
           quirks=(*_THINKING_QUIRKS[:1], "reasoning written inline (its template reads no "
                   "reasoning_content)", _THINKING_QUIRKS[2]),
           packing="auto",
           tests=(_TESTS + "test_thinking.py::test_template_without_reasoning_field",
                  _TESTS + "test_train.py::test_lora_trains[smollm3]")),
]


class ThinkingKeys(BaseModel):
    """Recipe keys of plugtune-qwen3."""

    model_config = ConfigDict(extra="forbid")

    enable_thinking: bool | None = Field(
        None, description=(
            "hybrid-thinking models (Qwen3, Qwen3.5, SmolLM3): true trains the reasoning "
            "(<think>...</think>, or an empty block where a turn has none); false drops it and "
            "trains answers after an empty think block in the prompt; also the chat template's "
            "default at generation. Unset: the data as given, the template's own default "
            "(LLaMA-Factory's enable_thinking)"))


def _owns(spec) -> bool:
    return spec.family in FAMILIES


def _enable_thinking(spec) -> bool | None:
    return getattr(spec.recipe, "enable_thinking", None)


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_recipe_keys():
    return [ThinkingKeys]


@hookimpl
def plugtune_load(spec):
    """Core's tokenizer and model loading; the chat template's ``enable_thinking`` default set
    from the recipe (:func:`plugtune_qwen3._thinking.set_thinking_default`). Packing for
    Qwen3.5 (``Family.packing = "refused"``) is refused by core before this runs
    (``plugtune.train.check_packing``)."""
    from plugtune.modeling import load_model, load_tokenizer
    from plugtune_qwen3._thinking import set_thinking_default

    if not _owns(spec):
        return None
    tok = load_tokenizer(spec)
    set_thinking_default(tok, _enable_thinking(spec))
    return Loaded(model=load_model(spec), tokenizer=tok)


@hookimpl
def plugtune_chat_rows(spec, tokenizer):
    """:class:`plugtune_qwen3._thinking.ThinkingRows` for the recipe's ``enable_thinking`` (also
    made the template's default here: ``plugtune prepare`` loads the tokenizer without
    ``plugtune_load``)."""
    from plugtune_qwen3._thinking import ThinkingRows, set_thinking_default

    if not _owns(spec):
        return None
    set_thinking_default(tokenizer, _enable_thinking(spec))
    return ThinkingRows(_enable_thinking(spec))


@hookimpl
def plugtune_generate(spec, tokenizer):
    """Set the recipe's ``enable_thinking`` as the template's default (a tokenizer loaded
    elsewhere gets it too), then pass: core's generic generation renders the prompts with the
    template, stops at ``<|im_end|>`` and keeps the model's ``<think>...</think>`` text
    (``<think>`` is not a special token)."""
    from plugtune_qwen3._thinking import set_thinking_default

    if _owns(spec):
        set_thinking_default(tokenizer, _enable_thinking(spec))
    return None
