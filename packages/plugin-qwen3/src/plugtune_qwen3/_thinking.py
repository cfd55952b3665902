"""Hybrid-thinking chat templates: where the reasoning goes, which turns train on it, one switch.

**What the template does at inference.** Qwen3's chat template (checked on the real tokenizer,
``../shared/data/tokenizers/qwen3``) renders an assistant turn with its ``<think>...</think>``
block only when the turn comes after the last user turn; earlier assistant turns are rendered
with their answer alone. The last turn always gets a block, an empty ``<think>\\n\\n</think>\\n\\n``
when it has no reasoning. The generation prompt is ``<|im_start|>assistant\\n`` (the model writes
its own block), or with ``enable_thinking=False`` ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``
(the model answers at once). So when the model answers turn *k* of a conversation it sees the
earlier turns *without* their reasoning and writes turn *k* *with* it.

**Why one row per conversation cannot be right.** Core renders a conversation turn by turn and
tokenizes it once (:func:`plugtune.data.tokenize.render_segments`). For Qwen3 that fails on any
multi-turn conversation ("not prefix-stable at turn 3"): turn 1 rendered as the last turn has a
think block, the prompt of turn 3 renders it without. Rendering the whole conversation once and
training every turn in it (LLaMA-Factory's ``ReasoningTemplate.encode_multiturn`` keeps the
reasoning of every turn as given; SkyRL ships a modified template that never strips) would
either train earlier turns without the reasoning the model writes at inference, or train on a
context the model never sees at inference.

**What this module does** (:class:`ThinkingRows`, the plugin's ``plugtune_chat_rows`` answer):
each trained assistant turn is trained on exactly what the template renders for it when it is
the turn being generated: the row is the conversation up to that turn, rendered by the
tokenizer's own template (earlier turns as the template renders them there, untrained context),
and the turn's text is the difference between ``render(messages[:k+1])`` and
``render(messages[:k], add_generation_prompt=True)``. Turns whose rendering does not change later
(Qwen3's multi-step tool calls after the last user turn keep their reasoning) share a row, so a
conversation costs as many rows as the template forces, not one per turn. The rule is the
template's own, probed by rendering, so it holds for any template that rewrites history.

**Where the reasoning is written in the data.** Either an assistant message's
``reasoning_content`` (what Qwen3's template and OpenAI-compatible servers use) or a
``<think>...</think>`` block leading its ``content`` (DeepSeek-R1 style exports). It is moved to
where the template reads it: ``reasoning_content`` when the template renders that field (Qwen3,
Qwen3.5), else inline ``<think>\\n...\\n</think>\\n`` before the answer (SmolLM3's template reads
only ``content``). Both layouts of one conversation therefore give the same tokens.

**The switch** (recipe key ``enable_thinking``, LLaMA-Factory's name and semantics):

* unset or ``true``: reasoning is trained as given; a turn without reasoning trains the empty
  block the template renders (LLaMA-Factory: "add empty cot ... do compute loss");
* ``false``: all reasoning is dropped from the data and the template's default becomes
  ``enable_thinking=false``, so the empty block is part of the *prompt* (not trained) and the
  model learns to answer at once, as it is asked to at inference (LLaMA-Factory: "remove all
  cot", empty cot "do not compute loss").

The default is written into the tokenizer's chat template (:func:`set_thinking_default`), so
every later render honours it without an argument: training, ``plugtune generate`` / ``chat`` /
``eval``, and the tokenizer saved into the run folder (vLLM and ``transformers`` pick it up). A
caller may still pass ``enable_thinking=`` explicitly; it wins over the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from plugtune.data.tokenize import rows_as_rendered

#: the reasoning delimiters of Qwen3 / Qwen3.5 / SmolLM3 (special tokens in their vocabularies)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROBE_REASONING = "PLUGTUNE_PROBE_REASONING"
#: marks the line :func:`set_thinking_default` puts in front of a template
_DEFAULT_MARK = "{#- plugtune: enable_thinking default #}"
_DEFAULT_HEAD = re.compile(re.escape(_DEFAULT_MARK) + r"\{%- if enable_thinking is not defined %\}"
                           r"\{%- set enable_thinking = (?:true|false) %\}\{%- endif %\}")


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of an assistant message.

    ``reasoning_content`` (a string) wins; otherwise a ``<think>...</think>`` block in
    ``content`` is split off the way Qwen3's template does it: the reasoning is the text before
    the first ``</think>`` (after the last ``<think>`` there), newlines stripped at both ends;
    the answer is what follows the last ``</think>``, leading newlines stripped. ``reasoning``
    is ``None`` when the message has neither.
    """
    content = message.get("content") or ""
    field = message.get("reasoning_content")
    if isinstance(field, str):
        return field.strip("\n"), content
    if THINK_CLOSE not in content:
        return None, content
    parts = content.split(THINK_CLOSE)
    return parts[0].split(THINK_OPEN)[-1].strip("\n"), parts[-1].lstrip("\n")


_FIELD_SUPPORT: dict[str, bool] = {}


def reads_reasoning_field(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders an assistant message's
    ``reasoning_content`` (probed once per template with a one-turn conversation)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _FIELD_SUPPORT:
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok", "reasoning_content": _PROBE_REASONING}]
        try:
            out = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # a template that cannot render the probe does not read the field
            out = ""
        _FIELD_SUPPORT[template] = _PROBE_REASONING in out
    return _FIELD_SUPPORT[template]


def place_reasoning(messages: list[dict], enable_thinking: bool | None, field: bool) -> list[dict]:
    """Copies of ``messages`` with each assistant turn's reasoning where the template reads it.

    Args:
        enable_thinking: ``False`` drops every turn's reasoning; ``None`` / ``True`` keep it.
        field: the template reads ``reasoning_content`` (:func:`reads_reasoning_field`): the
            reasoning goes there and ``content`` keeps the answer; otherwise it is written
            inline, ``<think>\\n{reasoning}\\n</think>\\n{answer}`` (a turn already written
            inline keeps its text).

    Other roles and turns without reasoning are returned unchanged (copied).
    """
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant":
            reasoning, answer = split_reasoning(m)
            inline = "reasoning_content" not in m
            m.pop("reasoning_content", None)
            if reasoning is not None:
                if enable_thinking is False:
                    m["content"] = answer
                elif field:
                    m["content"], m["reasoning_content"] = answer, reasoning
                elif not inline:
                    m["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{answer}"
        out.append(m)
    return out


@dataclass(frozen=True)
class ThinkingRows:
    """The ``plugtune_chat_rows`` answer: :func:`place_reasoning` then :func:`rows_as_rendered`.

    Picklable (a frozen dataclass of one flag). Called as ``rows(tokenizer, messages, tools)``
    inside ``datasets.map``; returns the message lists core tokenizes as rows.

    Attributes:
        enable_thinking: the recipe's ``enable_thinking`` (``None``: unset).
    """

    enable_thinking: bool | None = None

    def __call__(self, tokenizer, messages: list[dict], tools: list[dict] | None = None
                 ) -> list[list[dict]]:
        placed = place_reasoning(messages, self.enable_thinking, reads_reasoning_field(tokenizer))
        return rows_as_rendered(tokenizer, placed, tools)


def set_thinking_default(tokenizer, enable_thinking: bool | None) -> bool:
    """Make ``enable_thinking`` the default of the tokenizer's chat template.

    Puts ``{%- if enable_thinking is not defined %}{%- set enable_thinking = ... %}{%- endif %}``
    in front of the template (replacing one this function wrote before), so a render without
    the argument behaves as if it were passed, and an explicit argument still wins. Nothing
    changes when ``enable_thinking`` is ``None`` or the tokenizer has no chat template.

    Returns:
        Whether the template was changed.
    """
    template = getattr(tokenizer, "chat_template", None)
    if enable_thinking is None or not isinstance(template, str) or not template:
        return False
    template = _DEFAULT_HEAD.sub("", template, count=1)
    value = "true" if enable_thinking else "false"
    head = (f"{_DEFAULT_MARK}{{%- if enable_thinking is not defined %}}"
            f"{{%- set enable_thinking = {value} %}}{{%- endif %}}")
    tokenizer.chat_template = head + template
    return True
