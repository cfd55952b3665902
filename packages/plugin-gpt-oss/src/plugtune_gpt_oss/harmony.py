"""The harmony chat format of gpt-oss, as a Jinja chat template written for plugtune.

Written from OpenAI's public description of the format (the "harmony response format" guide and
the ``openai/harmony`` renderer's documented output), not copied from the checkpoint's file:

* every message is ``<|start|>{header}<|message|>{content}<|end|>``; an assistant header names
  its channel: ``assistant<|channel|>analysis`` (reasoning) or ``assistant<|channel|>final``
  (the answer shown to the user);
* a system message always comes first: the model identity, the knowledge cutoff, ``Reasoning:
  low|medium|high`` and the list of valid channels. The conversation's own system (or
  ``developer``) text becomes the developer message ``# Instructions\\n\\n{text}``. No "Current
  date" line: it would make every rendering depend on the day it was made;
* the generation prompt is ``<|start|>assistant``: the model writes the channel itself;
* the reasoning of earlier turns is dropped from the history (the format's rule); only the last
  assistant message renders its ``analysis`` message, from the message's ``reasoning_content``
  (plugtune's canonical key, filled from ``reasoning_content`` / ``thinking`` / ``reasoning``
  data fields) or ``thinking`` (the key Hugging Face's gpt-oss template reads);
* the final message of the last assistant turn ends with ``<|return|>`` (tool calls with
  ``<|call|>``); in a history it ends with ``<|end|>``.

**Trained end token.** The last message's ``final`` message ends with ``<|return|>``, the token
the model emits when its answer is complete (and the one inference servers stop on); in a
history it ends with ``<|end|>``. ``<|end|>`` is *not* a stop token: it also closes the
``analysis`` message that precedes the answer. Because an earlier turn renders differently in a
history, every trained turn before the last is trained in a row of its own that ends with it
(:class:`HarmonyRows`); :func:`set_generation_stops` writes the stop ids into the model's
``generation_config`` so a saved run stops in plain ``transformers`` too.

Tools are not rendered by this template (harmony describes them as a TypeScript namespace in the
developer message); plugtune's documented fallback for templates without tools applies
(schemas in the system turn, calls as JSON answers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: harmony's special tokens (o200k_harmony ids 200006, 200007, 200008, 200005, 200002, 200012,
#: 200003 in the real tokenizer); added to a tokenizer that lacks them
SPECIAL_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                  "<|constrain|>")
#: tokens that end an assistant response: ``<|return|>`` (the answer is complete) and
#: ``<|call|>`` (a tool call); not ``<|end|>``, which also ends the reasoning before the answer
STOP_TOKENS = ("<|return|>", "<|call|>")
#: ``reasoning_effort`` values harmony's system message accepts
EFFORTS = ("low", "medium", "high")
DEFAULT_EFFORT = "medium"

_SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\n"
           "Knowledge cutoff: 2024-06\n\n")
_CHANNELS = ("# Valid channels: analysis, commentary, final. "
             "Channel must be included for every message.")

#: first line of plugtune's template (tells it apart from a checkpoint's own)
MARKER = "{#- plugtune harmony template -#}"

_BODY = (
    MARKER +
    "{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort "
    "else '" + DEFAULT_EFFORT + "' -%}"
    "{{- '<|start|>system<|message|>" + _SYSTEM + "Reasoning: ' + effort + '\n\n"
    + _CHANNELS + "<|end|>' -}}"
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{%- set ns.last = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' or m['role'] == 'developer' -%}"
    "{{- '<|start|>developer<|message|># Instructions\n\n' + m['content'] | trim + '<|end|>' -}}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<|start|>user<|message|>' + m['content'] + '<|end|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if m['reasoning_content'] is defined and m['reasoning_content'] -%}"
    "{%- set r = m['reasoning_content'] -%}"
    "{%- elif m['thinking'] is defined and m['thinking'] -%}{%- set r = m['thinking'] -%}"
    "{%- else -%}{%- set r = '' -%}{%- endif -%}"
    "{%- if r and loop.index0 == ns.last and not add_generation_prompt -%}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + r | trim + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m['content'] | trim -}}"
    "{{- '<|return|>' if loop.last and not add_generation_prompt else '<|end|>' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{- '<|start|>functions.' + (m['name'] if m['name'] is defined and m['name'] else 'tool')"
    " + ' to=assistant<|channel|>commentary<|message|>' + m['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)

#: the template with the effort taken from a ``reasoning_effort`` render argument (``medium``
#: when absent)
HARMONY = _BODY


def harmony_template(effort: str | None = None) -> str:
    """The harmony chat template, with ``Reasoning: {effort}`` fixed when ``effort`` is given.

    Core renders templates without extra arguments, so a recipe's ``reasoning_effort`` is set
    inside the template (and saved with the tokenizer, so generation uses the same system
    message as training).

    Raises:
        ValueError: ``effort`` is not one of :data:`EFFORTS`.
    """
    if effort is None:
        return HARMONY
    if effort not in EFFORTS:
        raise ValueError(f"reasoning_effort: expected one of {', '.join(EFFORTS)}, got {effort!r}")
    return "{%- set reasoning_effort = '" + effort + "' -%}" + HARMONY


@dataclass(frozen=True)
class HarmonyRows:
    """The ``plugtune_chat_rows`` answer: the conversations to tokenize for one example so that
    every trained assistant turn is trained as it is rendered when it is the turn generated.

    Harmony renders an assistant turn one way as the last message (its ``analysis`` message,
    then ``final`` ending with ``<|return|>``) and another way in a later history (``final``
    only, ending with ``<|end|>``). So each trained turn before the last gets a row of its own
    that ends with it; the last row is the whole conversation with those turns as context
    (``"train": False``; core folds a context turn into the next prompt as the history renders
    it). In every row, reasoning is kept on the row's last turn only. A conversation with one
    trained turn is one row.

    Picklable (a frozen dataclass without fields); called as ``rows(tokenizer, messages, tools)``.
    """

    def __call__(self, tokenizer, messages: list[dict], tools: list[dict] | None = None
                 ) -> list[list[dict]]:
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        own_row = [i for i in turns[:-1] if messages[i].get("train") is not False]
        rows = [_row(messages[: i + 1], {j for j in turns if j < i}) for i in own_row]
        rows.append(_row(messages, set(turns[:-1])))
        return rows


def _row(messages: list[dict], context: set[int]) -> list[dict]:
    """``messages`` with reasoning removed from every message but the last and the turns at
    the indices in ``context`` marked ``"train": False``."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if i != len(messages) - 1:
            m.pop("reasoning_content", None)
            m.pop("thinking", None)
        if i in context and m.get("role") == "assistant":
            m["train"] = False
        out.append(m)
    return out


def install_template(tokenizer, effort: str | None = None, force: bool = False) -> list[str]:
    """Give ``tokenizer`` the harmony template when it has none (or ``force``), adding the
    :data:`SPECIAL_TOKENS` it lacks.

    A tokenizer that ships a template (a real gpt-oss checkpoint) keeps it unless ``force``;
    ``effort`` then only applies to plugtune's template.

    Returns:
        The special tokens new to the vocabulary (the caller resizes the embeddings; core's
        training does so when ``len(tokenizer)`` outgrows them).
    """
    from plugtune.token_rows import add_tokens

    added = add_tokens(tokenizer, SPECIAL_TOKENS)
    if force or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = harmony_template(effort)
    elif effort is not None:
        log.warning("reasoning_effort: %s applies to plugtune's harmony template; the tokenizer "
                    "ships its own chat template, which is kept", effort)
    return added


#: what precedes the answer in a harmony response
FINAL = "<|channel|>final<|message|>"


@dataclass(frozen=True)
class FinalText:
    """The answer of a generated harmony response: the text of its last ``final`` message.

    Called on a completion decoded *with* special tokens (padding after the stop included):
    ``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>``
    gives ``"Paris."``. A response with channels but no ``final`` message (cut off while
    reasoning, or a tool call) gives ``""``; text without any harmony marker (a model that does
    not speak harmony) is returned with the special tokens removed.

    Attributes:
        specials: the tokenizer's special token strings (the answer ends at the first one).
    """

    specials: tuple[str, ...]

    def __call__(self, text: str) -> str:
        if FINAL in text:
            body = text.rsplit(FINAL, 1)[1]
            cut = min((body.find(t) for t in self.specials if t and t in body), default=len(body))
            return body[:cut].strip()
        if "<|channel|>" in text:
            return ""
        for t in sorted(self.specials, key=len, reverse=True):
            if t:
                text = text.replace(t, "")
        return text.strip()


def final_text_parser(tokenizer) -> FinalText:
    """:class:`FinalText` for ``tokenizer`` (its special and added tokens, harmony's included)."""
    specials = set(tokenizer.all_special_tokens) | set(SPECIAL_TOKENS) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {})
    return FinalText(tuple(sorted(specials)))


def stop_ids(tokenizer) -> list[int]:
    """Ids of :data:`STOP_TOKENS` in ``tokenizer``'s vocabulary (absent ones skipped)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in STOP_TOKENS if t in vocab]


def set_generation_stops(model, tokenizer) -> list[int]:
    """Add :func:`stop_ids` to ``model.generation_config.eos_token_id`` (kept: the ids already
    there). Returns the resulting list."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return []
    have = gc.eos_token_id
    ids = [have] if isinstance(have, int) else list(have or [])
    for t in stop_ids(tokenizer):
        if t not in ids:
            ids.append(t)
    gc.eos_token_id = ids
    return ids
