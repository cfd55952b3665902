"""Format adapters: one raw record -> one canonical example.

Canonical examples (plain dicts, so ``datasets.map`` can carry them):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (alpaca, dolly, sharegpt, messages, completion),
* ``{"text": str}`` (raw text, unsupervised causal-LM fine-tuning),
* ``{"source": str, "target": str}`` (seq2seq, e.g. SAMSum dialogue -> summary),
* ``{"prompt": [messages], "chosen": str, "rejected": str}`` (preference pairs: DPO, ORPO,
  reward models),
* ``{"prompt": [messages], "completion": str, "label": bool}`` (unpaired preference, KTO),
* vision chat: ``{"messages": [...], "images": [absolute image paths]}`` whose message
  contents hold one :data:`IMAGE_PLACEHOLDER` per image, in order (``type: vision``).

Chat examples may carry tools: an assistant message with ``tool_calls`` (a JSON string of
``[{"type": "function", "function": {"name", "arguments"}}]``), ``tool`` messages (tool results)
and a top-level ``tools`` (a JSON string of the function schemas). They are JSON strings so Arrow
stores rows whose argument objects differ; :func:`template_messages` turns them back into the
objects a chat template reads. Message contents given as a list of parts (``[{"type": "text",
"text"|"value": ...}, {"type": "image"|"image_url", ...}]``, the OpenAI / HF / LLaMA-Factory v1
layout) become one string, with :data:`IMAGE_PLACEHOLDER` where each image was.

An assistant message may carry its reasoning in ``reasoning_content`` (a string, kept as is);
reasoning written inline as ``<think>...</think>`` stays in ``content``.

Every adapter raises :class:`BadRecord` naming the field and what was expected; the loader adds
the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

#: the placeholder for one image inside a vision example's message text (LLaMA-Factory's
#: ``mllm_demo.json`` layout); vision plugins replace it with their model's image tokens.
IMAGE_PLACEHOLDER = "<image>"
#: default user turn for image/caption pairs without a ``prompt`` column
CAPTION_PROMPT = "Describe this image."


class BadRecord(ValueError):
    """A record does not fit its format. ``field`` names the offending field."""

    def __init__(self, field: str, why: str):
        super().__init__(f"field {field!r}: {why}")
        self.field = field
        self.why = why


def _get(rec: Mapping, cols: Mapping[str, str], name: str, required: bool = True,
         allow_empty: bool = False) -> str:
    key = cols.get(name, name)
    if key not in rec:
        if required:
            raise BadRecord(key, f"missing (columns present: {', '.join(map(str, rec))})")
        return ""
    value = rec[key]
    if value is None:
        if required:
            raise BadRecord(key, "is missing or None; expected a string")
        return ""
    if not isinstance(value, str):
        raise BadRecord(key, f"expected a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise BadRecord(key, "is an empty string")
    return value


def _with_system(msgs: list[dict], system: str | None) -> list[dict]:
    if system and not (msgs and msgs[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def dolly(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
          shape: Shape | None = None) -> dict:
    """``instruction``, optional ``context``, ``response`` (databricks-dolly-15k)."""
    instr = _get(rec, cols, "instruction")
    ctx = _get(rec, cols, "context", required=False)
    out = _get(rec, cols, "response")
    user = f"{instr}\n\n{ctx}" if ctx.strip() else instr
    return {"messages": _with_system(
        [{"role": "user", "content": user}, {"role": "assistant", "content": out}], system)}


@dataclass
class Shape:
    """How a dataset spells its messages: the options of one dataset entry, per adapter call.

    Attributes:
        role_key / content_key: the message keys of role and content (``None``: detect
            ``role``/``content`` or ShareGPT ``from``/``value`` per message); axolotl's
            ``message_property_mappings``, LLaMA-Factory's ``tags.role_tag`` / ``content_tag``.
        roles: source role name -> canonical role (``user``, ``assistant``, ``system``, ``tool``,
            or :data:`FUNCTION_CALL` for an assistant tool call); axolotl's ``roles`` inverted,
            LLaMA-Factory's ``tags.*_tag``. Merged over :data:`DEFAULT_ROLES`.
        base_dir: folder that relative image paths resolve against.
        allow_images: image parts become placeholders + ``images`` (vision-capable types);
            otherwise an image part is an error.
        image_cache: folder where images embedded as bytes (parquet ``Image`` columns) are
            written once, named by content hash, so canonical examples hold paths.
        training_key: the message key whose boolean says whether an assistant turn is trained
            (axolotl ``message_field_training``); LLaMA-Factory v1's ``loss_weight`` (0 or 1)
            is read too.
    """

    role_key: str | None = None
    content_key: str | None = None
    roles: dict[str, str] = dc_field(default_factory=dict)
    base_dir: str | Path | None = None
    allow_images: bool = False
    image_cache: str | Path | None = None
    training_key: str | None = None

    def role(self, raw: Any) -> str | None:
        return {**DEFAULT_ROLES, **self.roles}.get(raw)


#: canonical role of an assistant turn that calls tools (LLaMA-Factory's ``function_call``)
FUNCTION_CALL = "function_call"
#: source role -> canonical role (ShareGPT, OpenAI, LLaMA-Factory, axolotl defaults)
DEFAULT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "model": "assistant", "bot": "assistant", "system": "system",
                 "developer": "system",  # OpenAI's newer name for system (harmony's instructions)
                 "function_call": FUNCTION_CALL, "observation": "tool", "tool": "tool",
                 "ipython": "tool", "function": "tool"}
_SHAREGPT_ROLES = DEFAULT_ROLES  # kept for callers of the old name
_IMAGE_PARTS = ("image", "image_url", "image_path")


def _image_source(part: Mapping) -> Any:
    """The path / url / bytes an image part points at (``None``: filled from ``images``)."""
    for key in ("image", "image_url", "url", "path", "value"):
        v = part.get(key)
        if isinstance(v, Mapping):
            v = v.get("url") or v.get("path") or (v if v.get("bytes") else None)
        if v:
            return v
    return None


def content_text(content: Any, where: str, shape: Shape | None = None,
                 images: list | None = None) -> str:
    """One message ``content`` as a string.

    A list of parts (``{"type": "text", "text"|"value"|"content": str}``, ``{"type": "image" |
    "image_url", ...}``) is joined without separators (as HF chat templates render parts); each
    image part becomes :data:`IMAGE_PLACEHOLDER` and its source (path, url, bytes or ``None``)
    is appended to ``images``.

    Raises:
        BadRecord: a part of unknown type, a text part without text, or an image part when
            ``images`` is ``None`` (a text-only dataset type).
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise BadRecord(where, f"expected a string or a list of parts, got {type(content).__name__}")
    out = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, Mapping):
            raise BadRecord(f"{where}[{i}]", f"expected a part mapping, got {type(part).__name__}")
        kind = part.get("type") or ("text" if "text" in part else None)
        if kind == "text":
            txt = next((part[k] for k in ("text", "value", "content") if isinstance(part.get(k), str)), None)
            if txt is None:
                raise BadRecord(f"{where}[{i}]", "text part without a 'text' (or 'value') string")
            out.append(txt)
        elif kind in _IMAGE_PARTS:
            if images is None or (shape is not None and not shape.allow_images):
                raise BadRecord(f"{where}[{i}]", f"an {kind!r} part in a text-only dataset; use "
                                "type: vision (or chat_template) with a vision model, or drop images")
            images.append(_image_source(part))
            out.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRecord(f"{where}[{i}].type", f"unknown part type {kind!r}; expected text, "
                            f"{', '.join(_IMAGE_PARTS)}")
    return "".join(out)


def _tool_calls(value: Any, where: str) -> str:
    """A function-call turn's value -> canonical ``tool_calls`` JSON string.

    Accepts ``{"name", "arguments"}`` (arguments an object or a JSON string), a list of those,
    or OpenAI ``[{"type": "function", "function": {...}}]``, as a JSON string or as objects."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRecord(where, f"a function call must be JSON {{\"name\", \"arguments\"}} "
                            f"({exc.msg} at column {exc.colno})") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise BadRecord(where, "a function call needs a 'name' string and 'arguments'")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise BadRecord(where, "function call 'arguments' is a string but not JSON") from None
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    if not out:
        raise BadRecord(where, "an empty list of function calls")
    return json.dumps(out, ensure_ascii=False)


def _tools_json(value: Any, where: str) -> str:
    """The ``tools`` column -> JSON string of a list of function schemas ('' when empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRecord(where, f"tools must be a JSON list of function schemas ({exc.msg})") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise BadRecord(where, "tools must be a list of function schemas (objects)")
    return json.dumps(value, ensure_ascii=False) if value else ""


def _turns(value: Any, key: str, role_key: str | None = None, content_key: str | None = None,
           shape: Shape | None = None, images: list | None = None,
           need_assistant: bool = True) -> list[dict]:
    """A list of turns -> canonical messages (roles mapped, parts joined, tool calls kept)."""
    shape = shape or Shape()
    role_key, content_key = shape.role_key or role_key, shape.content_key or content_key
    if not isinstance(value, list) or not value:
        raise BadRecord(key, "expected a non-empty list of turns")
    msgs: list[dict] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise BadRecord(f"{key}[{i}]", f"expected a mapping, got {type(turn).__name__}")
        rk = role_key or ("role" if "role" in turn else "from")
        ck = content_key or ("content" if rk == "role" else "value")
        raw_role = turn.get(rk)
        role = shape.role(raw_role)
        if role is None:
            known = sorted({**DEFAULT_ROLES, **shape.roles})
            raise BadRecord(f"{key}[{i}].{rk}", f"unknown role {raw_role!r}; expected one of "
                            f"{known} (map others with roles: / tags:)")
        where = f"{key}[{i}].{ck}"
        if role == FUNCTION_CALL or turn.get("tool_calls"):
            calls = _tool_calls(turn.get("tool_calls") or turn.get(ck), where)
            text = content_text(turn.get(ck), where, shape, images) if role != FUNCTION_CALL else ""
            msgs.append({"role": "assistant", "content": text, "tool_calls": calls,
                         **_reasoning(turn, f"{key}[{i}]")})
            continue
        content = content_text(turn.get(ck), where, shape, images)
        if not content.strip() and IMAGE_PLACEHOLDER not in content:
            raise BadRecord(where, "expected a non-empty string")
        msgs.append({"role": role, "content": content,
                     **(_reasoning(turn, f"{key}[{i}]") if role == "assistant" else {})})
        if role == "assistant" and not _trained(turn, f"{key}[{i}]", shape):
            msgs[-1]["train"] = False
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord(key, "has no assistant turn to train on")
    return msgs


#: message keys that hold an assistant turn's reasoning apart from its answer, first found wins:
#: ``reasoning_content`` (Qwen3 / DeepSeek-R1 templates, OpenAI-compatible servers),
#: ``thinking`` (Hugging Face's gpt-oss template), ``reasoning`` (OpenRouter-style exports)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _reasoning(turn: Mapping, where: str) -> dict:
    """``{"reasoning_content": str}`` when an assistant turn carries its reasoning apart from
    its answer under one of :data:`REASONING_KEYS` (``thinking`` / ``reasoning`` are renamed),
    else ``{}``. Family plugins decide how it is rendered and trained (``plugtune_chat_rows``);
    templates that do not read the field ignore it.

    Raises:
        BadRecord: the value is not a string (names the turn and key).
    """
    for k in REASONING_KEYS:
        value = turn.get(k)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRecord(f"{where}.{k}", f"expected a string, got {type(value).__name__}")
        return {"reasoning_content": value} if value.strip() else {}
    return {}


def _trained(turn: Mapping, where: str, shape: Shape) -> bool:
    """Whether an assistant turn is trained: ``shape.training_key`` (a bool) or LLaMA-Factory
    v1's ``loss_weight`` (0 or 1; other weights are refused: plugtune's loss has none)."""
    if shape.training_key and turn.get(shape.training_key) is not None:
        flag = turn[shape.training_key]
        if not isinstance(flag, bool):
            raise BadRecord(f"{where}.{shape.training_key}", f"expected true/false, got {flag!r}")
        return flag
    weight = turn.get("loss_weight")
    if weight is None:
        return True
    if weight not in (0, 1):
        raise BadRecord(f"{where}.loss_weight", f"{weight!r}: only 0 (not trained) or 1 "
                        "(trained) is supported; plugtune does not weight turns")
    return bool(weight)


def _row_system(rec: Mapping, cols: Mapping[str, str], system: str | None) -> str | None:
    """The row's own system prompt (``columns: {system: ...}``, or a ``system`` column when the
    type reads one) over the recipe's ``system_prompt``."""
    key = cols.get("system")
    value = rec.get(key) if key else None
    return value if isinstance(value, str) and value.strip() else system


def _with_tools(out: dict, rec: Mapping, cols: Mapping[str, str]) -> dict:
    key = cols.get("tools", "tools")
    if key in rec:
        tools = _tools_json(rec[key], key)
        if tools:
            out["tools"] = tools
    return out


def alpaca(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
           shape: Shape | None = None) -> dict:
    """``instruction``, optional ``input``, ``output`` (Stanford Alpaca; axolotl ``alpaca`` and
    ``alpaca:chat``), with LLaMA-Factory's optional ``system`` column and ``history`` (a list of
    ``[instruction, response]`` pairs before this turn; their responses are trained too)."""
    instr = _get(rec, cols, "instruction")
    inp = _get(rec, cols, "input", required=False)
    out = _get(rec, cols, "output")
    user = f"{instr}\n\n{inp}" if inp.strip() else instr
    msgs: list[dict] = []
    hkey = cols.get("history", "history")
    for i, pair in enumerate(rec.get(hkey) or []):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise BadRecord(f"{hkey}[{i}]", "expected a [instruction, response] pair of strings")
        msgs += [{"role": "user", "content": pair[0], "input": ""},
                 {"role": "assistant", "content": pair[1], "input": ""}]
    # ``input`` kept beside the joined content: the named ``alpaca`` template renders Stanford's
    # with-input prompt (``### Input:``) from it; other templates read ``content`` only
    msgs += [{"role": "user", "content": user, "input": inp if inp.strip() else ""},
             {"role": "assistant", "content": out, "input": ""}]
    return {"messages": _with_system(msgs, _row_system(rec, cols, system))}


def prompt_completion(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
                      shape: Shape | None = None) -> dict:
    """``prompt`` / ``completion`` (also ``prompt`` / ``answer`` via ``columns``): the prompt is
    the user turn, the completion the trained answer (TRL's prompt-completion layout; this was
    plugtune's ``type: completion`` before it took axolotl's meaning)."""
    prompt = _get(rec, cols, "prompt")
    out = _get(rec, cols, "completion")
    return {"messages": _with_system(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}],
        _row_system(rec, cols, system))}


def completion(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
               shape: Shape | None = None) -> dict:
    """axolotl's ``completion``: raw text from the column ``field`` (default ``text``), every
    token trained, cut into ``sequence_len`` windows.

    Raises:
        BadRecord: the text column is missing; when the row has ``prompt``/``completion``
            columns instead, the message points at ``type: prompt_completion`` (the old meaning
            of plugtune's ``completion``).
    """
    key = cols.get("text", "text")
    if key not in rec and "prompt" in rec and "completion" in rec:
        raise BadRecord(key, "missing: type: completion is raw text (axolotl's meaning; the "
                        "column is set with field:), but these rows have prompt/completion "
                        "columns: use type: prompt_completion (plugtune's former 'completion')")
    return {"text": _get(rec, cols, "text")}


def sharegpt(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
             shape: Shape | None = None) -> dict:
    """``conversations``: ``[{"from": "human"|"gpt"|"system"|"function_call"|"observation",
    "value": str}, ...]`` (+ optional ``system`` and ``tools`` columns; LLaMA-Factory's
    ShareGPT, including function calling)."""
    key = cols.get("conversations", cols.get("messages", "conversations"))
    if key not in rec:
        raise BadRecord(key, "missing")
    out = {"messages": _with_system(_turns(rec[key], key, "from", "value", shape),
                                    _row_system(rec, cols, system))}
    return _with_tools(out, rec, cols)


def messages(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
             shape: Shape | None = None) -> dict:
    """``messages``: ``[{"role": ..., "content": str | parts, "tool_calls"?: ...}, ...]``
    (OpenAI / TRL layout; axolotl ``chat_template`` with ``field_messages``), + ``tools``."""
    key = cols.get("messages", cols.get("conversations", "messages"))
    if key not in rec:
        raise BadRecord(key, f"missing (columns present: {', '.join(map(str, rec))})")
    images: list = []
    msgs = _turns(rec[key], key, "role", "content", shape, images)
    out = _with_tools({"messages": _with_system(msgs, _row_system(rec, cols, system))}, rec, cols)
    if images or (shape and shape.allow_images and cols.get("images", "images") in rec):
        out["images"] = _fill_images(images, rec, cols, shape)
    return out


def text(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
         shape: Shape | None = None) -> dict:
    """``text``: raw text for unsupervised causal-LM fine-tuning (every token trained)."""
    return {"text": _get(rec, cols, "text")}


def seq2seq(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
            shape: Shape | None = None) -> dict:
    """``source`` / ``target`` (SAMSum: ``columns: {source: dialogue, target: summary}``).

    An encoder-decoder has no system turn: ``system_prompt`` becomes the task prefix of the
    source, T5 style (``system_prompt: "summarize:"`` gives ``"summarize: <dialogue>"``; Raffel
    et al. 2020, and the FLAN-T5 SAMSum recipes), see :func:`with_task_prefix`."""
    return {"source": with_task_prefix(_get(rec, cols, "source"), system),
            "target": _get(rec, cols, "target")}


def with_task_prefix(source: str, prefix: str | None) -> str:
    """``prefix`` + ``source``, separated by one space unless ``prefix`` already ends in
    whitespace (``"summarize:"`` -> ``"summarize: text"``, ``"Summarize:\\n"`` -> as is);
    ``source`` unchanged when there is no prefix."""
    if not prefix:
        return source
    return prefix + source if prefix[-1].isspace() else f"{prefix} {source}"


def with_system_prompt(prompt: str, system: str | None, task: str) -> str | list[dict]:
    """A generation prompt as the training data saw it: for ``seq2seq`` the task prefix is
    prepended (:func:`with_task_prefix`); for chat a system turn is added (a message list for
    the chat template); anything else is returned unchanged."""
    if not system:
        return prompt
    if task == "seq2seq":
        return with_task_prefix(prompt, system)
    if task == "chat":
        return _with_system([{"role": "user", "content": prompt}], system)
    return prompt


_HH = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_turns(text_: str) -> list[dict] | None:
    """Anthropic HH transcript text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) -> messages."""
    parts = _HH.split(text_)
    if len(parts) < 3 or parts[0].strip():
        return None
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _answer(value: Any, key: str, shape: Shape | None) -> tuple[list[dict] | None, str]:
    """One side of a pair -> ``(turns before the answer or None, answer text)``.

    A string is the answer (or an HH transcript); a mapping is one assistant message; a list of
    messages is a transcript whose last turn is the answer (TRL conversational, Anthropic HH)."""
    if isinstance(value, str):
        turns = _hh_turns(value) if "\n\nAssistant:" in value else None
        if turns is None:
            if not value.strip():
                raise BadRecord(key, "is an empty string")
            return None, value
        value = turns
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRecord(key, "expected a string, a message or a list of messages")
    turns = _turns(value, key, shape=shape, need_assistant=False)
    if turns[-1]["role"] != "assistant":
        raise BadRecord(key, f"the last turn is {turns[-1]['role']!r}; expected the assistant answer")
    return turns[:-1] or None, turns[-1]["content"]


def _prompt_turns(rec: Mapping, c: Mapping[str, str], shape: Shape | None) -> list[dict] | None:
    """The prompt of a preference / KTO row from its prompt columns (``None``: there are none)."""
    for name in ("prompt", "messages", "conversations"):
        key = c.get(name, name)
        if key in rec and rec[key] is not None:
            value = rec[key]
            if isinstance(value, str):
                if not value.strip():
                    raise BadRecord(key, "is an empty string")
                return [{"role": "user", "content": value}]
            return _turns(value, key, shape=shape, need_assistant=False)
    for name in ("instruction", "question", "input"):
        key = c.get(name, name)
        if isinstance(rec.get(key), str) and rec[key].strip():
            user = rec[key]
            extra = rec.get(c.get("input", "input")) if name == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                user = f"{user}\n\n{extra}"
            return [{"role": "user", "content": user}]
    return None


def _pref_system(rec: Mapping, c: Mapping[str, str], system: str | None) -> str | None:
    return _row_system(rec, {"system": "system", **c}, system)


def preference(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
               shape: Shape | None = None) -> dict:
    """Preference pairs in the layouts people export, detected per record.

    * ``prompt`` / ``chosen`` / ``rejected`` as strings (TRL standard) or message lists (TRL
      conversational: ``prompt`` = messages, ``chosen``/``rejected`` = ``[assistant message]``);
    * full transcripts without a prompt (Anthropic HH, as message lists or as
      ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` text; LLaMA-Factory v1 ``chosen_messages`` /
      ``rejected_messages``): the prompt is everything before the last assistant turn, which
      must be the same in both;
    * ShareGPT / messages + ``chosen``/``rejected`` as one message (LLaMA-Factory
      ``dpo_en_demo.json``; axolotl ``chat_template.default`` with ``field_messages``);
    * ``prompt`` string + ``chosen``/``rejected`` as [user, assistant] (axolotl
      ``chat_template.argilla``, argilla ultrafeedback);
    * ``system`` / ``input`` / ``chosen`` / ``rejected`` strings (axolotl
      ``bradley_terry.chat_template``, distilabel orca pairs); ``instruction``/``input``
      (LLaMA-Factory alpaca ranking); ``question`` / ``response_j`` / ``response_k``
      (StackExchange paired).
    A ``system`` column becomes the system turn.
    """
    c = dict(cols)
    if "question" in rec and "response_j" in rec:
        c.setdefault("prompt", "question")
        c.setdefault("chosen", "response_j")
        c.setdefault("rejected", "response_k")
    ck, rk = c.get("chosen", "chosen"), c.get("rejected", "rejected")
    if ck not in rec and "chosen_messages" in rec:
        ck, rk = "chosen_messages", "rejected_messages"
    for key in (ck, rk):
        if rec.get(key) is None:
            raise BadRecord(key, f"missing (columns present: {', '.join(map(str, rec))})")
    c_prompt, chosen = _answer(rec[ck], ck, shape)
    r_prompt, rejected = _answer(rec[rk], rk, shape)
    prompt = c_prompt or _prompt_turns(rec, c, shape)
    if prompt is None:
        raise BadRecord(ck, "no prompt: expected a prompt column (prompt, messages, "
                        "conversations, instruction, input) or full transcripts in chosen/rejected")
    if c_prompt and r_prompt and c_prompt != r_prompt:
        raise BadRecord(rk, "chosen and rejected differ before their last assistant turn; "
                        "a pair must share its prompt")
    if prompt[-1]["role"] == "assistant":
        raise BadRecord(ck, "the prompt ends with an assistant turn; expected a user turn last")
    return _distinct_pair({"prompt": _with_system(prompt, _pref_system(rec, c, system)),
                           "chosen": chosen, "rejected": rejected}, {**c, "rejected": rk})


def _distinct_pair(pair: dict, cols: Mapping[str, str]) -> dict:
    """``pair`` unchanged, or :class:`BadRecord` when its chosen and rejected answers are the
    same text (DPO's loss is then zero: the pair teaches nothing)."""
    if pair["chosen"] == pair["rejected"]:
        raise BadRecord(cols.get("rejected", "rejected"),
                        "is identical to chosen; a preference pair needs two different answers")
    return pair


_TRUE = {True, "true", "True", "1", "yes"}
_FALSE = {False, "false", "False", "0", "no"}


def kto(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
        shape: Shape | None = None) -> dict:
    """Unpaired preference (KTO): one answer and whether it is desirable.

    * ``prompt`` (string or messages) / ``completion`` (string, message list or
      [user, assistant]) / ``label`` (TRL unpaired layout; axolotl ``llama3.ultra`` with its
      optional ``system``);
    * ``messages`` (or ShareGPT ``conversations``) whose last assistant turn is the answer +
      ``label`` / ``kto_tag`` (LLaMA-Factory ``kto_en_demo.json``).
    """
    c = dict(cols)
    lk = c.get("label") or next((k for k in ("label", "kto_tag") if k in rec), "label")
    raw = rec.get(lk)
    if raw in _TRUE:
        label = True
    elif raw in _FALSE:
        label = False
    else:
        raise BadRecord(lk, f"expected a boolean label (true = desirable), got {raw!r}")
    ckey = c.get("completion", "completion")
    if ckey in rec and rec[ckey] is not None:
        before, answer = _answer(rec[ckey], ckey, shape)
        prompt = before or _prompt_turns(rec, c, shape)
    else:
        for name in ("messages", "conversations"):
            key = c.get(name, name)
            if key in rec:
                turns = _turns(rec[key], key, shape=shape)
                last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
                prompt, answer = turns[:last], turns[last]["content"]
                break
        else:
            raise BadRecord(ckey, "missing: a KTO row has prompt + completion + label, or "
                            f"messages + label (columns present: {', '.join(map(str, rec))})")
    if not prompt:
        raise BadRecord(c.get("prompt", "prompt"), "no prompt before the answer")
    return {"prompt": _with_system(prompt, _pref_system(rec, c, system)),
            "completion": answer, "label": label}


def _resolve_image(value: Any, key: str, shape: Shape | None) -> str:
    """An image reference -> absolute path of a readable image.

    Strings are paths (relative ones resolve against ``shape.base_dir``; if absent there, with
    their leading folders dropped one at a time, since exports such as LLaMA-Factory v1 name
    ``data/mllm_demo_data/1.jpg`` relative to the tool's root); ``{"bytes": ..., "path": ...}``
    (a parquet ``Image`` column) is written once to ``shape.image_cache`` named by its hash.
    """
    base = shape.base_dir if shape else None
    if isinstance(value, Mapping) and value.get("bytes"):
        data = value["bytes"]
        cache = Path(shape.image_cache if shape and shape.image_cache else
                     Path.home() / ".cache" / "plugtune" / "images")
        suffix = Path(value.get("path") or "").suffix or ".img"
        out = cache / (hashlib.sha256(data).hexdigest()[:32] + suffix)
        if not out.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
        return _image_path(str(out), key, None)
    if isinstance(value, Mapping):
        value = value.get("path") or value.get("url")
    if isinstance(value, str) and base is not None and not Path(value).is_absolute():
        parts = Path(value).parts
        for i in range(len(parts)):
            if (Path(base) / Path(*parts[i:])).is_file():
                value = str(Path(*parts[i:]))
                break
    return _image_path(value, key, base)


def _fill_images(from_parts: list, rec: Mapping, cols: Mapping[str, str],
                 shape: Shape | None) -> list[str]:
    """Image paths in placeholder order: the parts' own sources, and the ``images`` column for
    parts that name none (HF ``{"type": "image"}``) or for ``<image>`` text placeholders."""
    key = cols.get("images", "images")
    column = rec.get(key)
    if column is None:
        column = []
    if isinstance(column, str | Mapping):
        column = [column]
    if not isinstance(column, list):
        raise BadRecord(key, f"expected a list of images, got {type(column).__name__}")
    column = iter(column)
    out, i = [], 0
    for src in from_parts:
        if src is None:
            src = next(column, None)
            if src is None:
                raise BadRecord(key, "fewer images than image parts in the messages")
        out.append(_resolve_image(src, f"{key}[{i}]", shape))
        i += 1
    if not from_parts:
        out = [_resolve_image(v, f"{key}[{j}]", shape) for j, v in enumerate(column)]
    return out


def _image_path(value: Any, key: str, base_dir: str | Path | None) -> str:
    """Resolve one image path against ``base_dir`` and check it is a readable image (Pillow)."""
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(key, f"expected an image path string, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.resolve()
    if not path.is_file():
        raise BadRecord(key, f"image file {str(path)!r} does not exist")
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is the 'vision' extra
        raise BadRecord(key, "reading images needs Pillow: pip install 'plugtune[vision]'") from exc
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        raise BadRecord(key, f"image file {str(path)!r} is not a readable image ({exc})") from None
    return str(path)


def vision(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
           base_dir: str | Path | None = None, shape: Shape | None = None) -> dict:
    """Images + chat, in the layouts detected per record.

    * ``messages`` (role/content) + ``images``: LLaMA-Factory's ``mllm_demo.json`` layout; each
      ``<image>`` in the message texts stands for the next image of ``images``;
    * ``conversations`` (ShareGPT from/value) + ``images``: the same with ShareGPT turns;
    * contents as lists of parts (HF ``llava-instruct-mix-vsft``: ``{"type": "image"}`` parts
      filled in order from an ``images`` column of paths or embedded bytes; LLaMA-Factory v1:
      ``{"type": "image_url", "value": path}``);
    * ``image`` + ``caption`` (+ optional ``prompt``): an image/caption pair becomes
      ``user: <image>{prompt}`` / ``assistant: {caption}`` (default prompt
      :data:`CAPTION_PROMPT`).

    A record without images is a text-only sample. Relative image paths are resolved against
    ``base_dir`` (the dataset's ``image_dir``, else its folder) and each file is checked with
    Pillow, so a missing or unreadable image names the record and the path. The number of
    ``<image>`` placeholders must equal the number of images.
    """
    shape = shape or Shape()
    if base_dir is not None:
        shape = dc_replace(shape, base_dir=base_dir)
    shape = dc_replace(shape, allow_images=True)
    c = dict(cols)
    img_key, cap_key = c.get("image", "image"), c.get("caption", "caption")
    sys_ = _row_system(rec, c, system)
    mkey = next((c.get(n, n) for n in ("messages", "conversations") if c.get(n, n) in rec), None)
    if mkey is not None:
        parts: list = []
        msgs = _with_system(_turns(rec[mkey], mkey, shape=shape, images=parts), sys_)
        images = _fill_images(parts, rec, c, shape)
    elif img_key in rec and cap_key in rec:
        prompt = _get(rec, c, "prompt", required=False) or CAPTION_PROMPT
        caption = _get(rec, c, "caption")
        msgs = _with_system([{"role": "user", "content": IMAGE_PLACEHOLDER + prompt},
                             {"role": "assistant", "content": caption}], sys_)
        return {"messages": msgs, "images": [_resolve_image(rec[img_key], img_key, shape)]}
    else:
        raise BadRecord(c.get("messages", "messages"),
                        "missing: a vision record has messages (or conversations) + images, "
                        f"or image + caption (columns present: {', '.join(map(str, rec))})")
    n_tags = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    if n_tags != len(images):
        raise BadRecord(c.get("images", "images"),
                        f"{len(images)} image(s) but {n_tags} {IMAGE_PLACEHOLDER} "
                        "placeholder(s) in the messages; put one placeholder per image")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
            "images": images}


def vision_features():
    """``datasets.Features`` of canonical vision examples (fixed, so text-only and image
    samples mix: an all-empty ``images`` batch would otherwise be typed ``null``)."""
    import datasets

    return datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.Value("string")}),
        "images": datasets.List(datasets.Value("string")),
    })


def chat_template(rec: Mapping, cols: Mapping[str, str], system: str | None = None,
                  shape: Shape | None = None) -> dict:
    """axolotl's ``chat_template``: ``field_messages`` (default ``messages``) rendered by the
    chat template; contents may be parts with images (then it is a vision example)."""
    shape = shape or Shape()
    key = cols.get("messages", "messages")
    value = rec.get(key)
    has_images = cols.get("images", "images") in rec or (isinstance(value, list) and any(
        isinstance(t, Mapping) and isinstance(t.get(shape.content_key or "content"), list)
        and any(isinstance(p, Mapping) and p.get("type") in _IMAGE_PARTS
                for p in t[shape.content_key or "content"]) for t in value))
    if has_images:
        return vision(rec, cols, system, shape=shape)
    return messages(rec, cols, system, shape)


def template_messages(example: Mapping) -> tuple[list[dict], list[dict] | None]:
    """A canonical chat example -> ``(messages, tools)`` as a chat template reads them.

    Keys Arrow filled with ``None`` are dropped; ``tool_calls`` and ``tools`` JSON strings
    become objects (``tool_calls[i].function.arguments`` a mapping, as HF templates expect)."""
    msgs = []
    for m in example["messages"]:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("tool_calls"), str):
            m["tool_calls"] = json.loads(m["tool_calls"])
        msgs.append(m)
    tools = example.get("tools")
    return msgs, (json.loads(tools) if tools else None)


#: the system text the tool fallback writes before the tool schemas
TOOLS_FALLBACK_HEADER = (
    "You have access to the following functions. To call one, answer with a JSON object "
    '{"name": <function name>, "arguments": <arguments object>}.\n\n')
#: prefix of a tool result turn in the tool fallback
OBSERVATION_PREFIX = "Observation: "


def flatten_tools(msgs: list[dict], tools: list[dict] | None) -> list[dict]:
    """The documented fallback for chat templates without tool support.

    * the tool schemas go into the system turn (appended to it, or a new one):
      :data:`TOOLS_FALLBACK_HEADER` + one JSON schema per line;
    * an assistant tool call becomes an assistant turn whose text is the call as JSON,
      ``{"name": ..., "arguments": {...}}`` (one per line when several; trained like any answer);
    * a tool result becomes a user turn ``"Observation: <result>"``.
    """
    out = []
    for m in msgs:
        if m.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": c["function"]["name"],
                                          "arguments": c["function"]["arguments"]},
                                         ensure_ascii=False) for c in m["tool_calls"])
            text_ = f"{m['content']}\n{calls}" if m.get("content") else calls
            out.append({"role": "assistant", "content": text_})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": OBSERVATION_PREFIX + m["content"]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        spec = TOOLS_FALLBACK_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{spec}"}
        else:
            out.insert(0, {"role": "system", "content": spec})
    return out


ADAPTERS: dict[str, Callable[..., dict]] = {
    "alpaca": alpaca,
    "alpaca:chat": alpaca,
    "dolly": dolly,
    "completion": completion,
    "prompt_completion": prompt_completion,
    "sharegpt": sharegpt,
    "messages": messages,
    "chat_template": chat_template,
    "text": text,
    "seq2seq": seq2seq,
    "preference": preference,
    "chat_template.default": preference,
    "chat_template.argilla": preference,
    "chat_template.argilla_chat": preference,
    "bradley_terry.chat_template": preference,
    "kto": kto,
    "llama3.ultra": kto,
    "vision": vision,
}


#: what each dataset ``type``'s adapter produces (see :func:`kind_of`)
KINDS = {"alpaca": "chat", "alpaca:chat": "chat", "dolly": "chat", "prompt_completion": "chat",
         "sharegpt": "chat", "messages": "chat", "chat_template": "chat", "vision": "chat",
         "seq2seq": "seq2seq", "text": "text", "completion": "text", "preference": "preference",
         "chat_template.default": "preference", "chat_template.argilla": "preference",
         "chat_template.argilla_chat": "preference", "bradley_terry.chat_template": "preference",
         "kto": "kto", "llama3.ultra": "kto"}


def kind_of(example: Mapping) -> str:
    """``"chat"``, ``"text"``, ``"seq2seq"``, ``"preference"`` or ``"kto"`` for a canonical
    example."""
    if "chosen" in example and example["chosen"] is not None:
        return "preference"
    if "label" in example and "completion" in example and example["label"] is not None:
        return "kto"
    if "messages" in example and example["messages"] is not None:
        return "chat"
    if "source" in example and example["source"] is not None:
        return "seq2seq"
    return "text"
