"""Format adapters: one raw record -> one canonical example.

Canonical examples (plain dicts, so ``datasets.map`` can carry them):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (alpaca, dolly, sharegpt, messages, completion),
* ``{"text": str}`` (raw text, unsupervised causal-LM fine-tuning),
* ``{"source": str, "target": str}`` (seq2seq, e.g. SAMSum dialogue -> summary),
* ``{"prompt": [messages], "chosen": str, "rejected": str}`` (preference pairs, DPO).

Every adapter raises :class:`BadRecord` naming the field and what was expected; the loader adds
the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


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


def alpaca(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``instruction``, optional ``input``, ``output`` (Stanford Alpaca)."""
    instr = _get(rec, cols, "instruction")
    inp = _get(rec, cols, "input", required=False)
    out = _get(rec, cols, "output")
    user = f"{instr}\n\n{inp}" if inp.strip() else instr
    return {"messages": _with_system(
        [{"role": "user", "content": user}, {"role": "assistant", "content": out}], system)}


def dolly(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``instruction``, optional ``context``, ``response`` (databricks-dolly-15k)."""
    instr = _get(rec, cols, "instruction")
    ctx = _get(rec, cols, "context", required=False)
    out = _get(rec, cols, "response")
    user = f"{instr}\n\n{ctx}" if ctx.strip() else instr
    return {"messages": _with_system(
        [{"role": "user", "content": user}, {"role": "assistant", "content": out}], system)}


def completion(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``prompt`` / ``completion`` (also ``prompt`` / ``answer`` via ``columns``)."""
    prompt = _get(rec, cols, "prompt")
    out = _get(rec, cols, "completion")
    return {"messages": _with_system(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}], system)}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant", "bot": "assistant"}


def _turns(value: Any, key: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(key, "expected a non-empty list of turns")
    msgs = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise BadRecord(f"{key}[{i}]", f"expected a mapping, got {type(turn).__name__}")
        role = turn.get(role_key)
        content = turn.get(content_key)
        if role not in _SHAREGPT_ROLES:
            raise BadRecord(f"{key}[{i}].{role_key}",
                            f"unknown role {role!r}; expected one of {sorted(_SHAREGPT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(f"{key}[{i}].{content_key}", "expected a non-empty string")
        msgs.append({"role": _SHAREGPT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord(key, "has no assistant turn to train on")
    return msgs


def sharegpt(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``conversations``: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]``."""
    key = cols.get("conversations", "conversations")
    if key not in rec:
        raise BadRecord(key, "missing")
    return {"messages": _with_system(_turns(rec[key], key, "from", "value"), system)}


def messages(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``messages``: ``[{"role": ..., "content": ...}, ...]`` (OpenAI / TRL layout)."""
    key = cols.get("messages", "messages")
    if key not in rec:
        raise BadRecord(key, "missing")
    return {"messages": _with_system(_turns(rec[key], key, "role", "content"), system)}


def text(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``text``: raw text for unsupervised causal-LM fine-tuning (every token trained)."""
    return {"text": _get(rec, cols, "text")}


def seq2seq(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """``source`` / ``target`` (SAMSum: ``columns: {source: dialogue, target: summary}``)."""
    return {"source": _get(rec, cols, "source"), "target": _get(rec, cols, "target")}


def preference(rec: Mapping, cols: Mapping[str, str], system: str | None = None) -> dict:
    """Preference pairs in three layouts, detected per record.

    * ``prompt`` / ``chosen`` / ``rejected`` (strings; TRL's layout),
    * ShareGPT: ``conversations`` + ``chosen`` / ``rejected`` as ``{from, value}``
      (LLaMA-Factory ``dpo_en_demo.json``),
    * ``question`` / ``response_j`` (preferred) / ``response_k`` (StackExchange paired).
    """
    c = dict(cols)
    if c.get("conversations", "conversations") in rec:
        key = c.get("conversations", "conversations")
        prompt = _turns(rec[key], key, "from", "value") if any(
            (t or {}).get("from") in ("gpt", "assistant") for t in rec[key] or []
        ) else [
            {"role": _SHAREGPT_ROLES.get(t.get("from"), "user"), "content": t.get("value")}
            for t in rec[key]
        ]
        for i, m in enumerate(prompt):
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise BadRecord(f"{key}[{i}].value", "expected a non-empty string")
        out = {}
        for side in ("chosen", "rejected"):
            v = rec.get(c.get(side, side))
            if isinstance(v, Mapping):
                v = v.get("value")
            if not isinstance(v, str) or not v.strip():
                raise BadRecord(side, "expected a non-empty string or {from, value}")
            out[side] = v
        return {"prompt": _with_system(prompt, system), **out}
    if "question" in rec and "response_j" in rec:
        c.setdefault("prompt", "question")
        c.setdefault("chosen", "response_j")
        c.setdefault("rejected", "response_k")
    prompt = _get(rec, c, "prompt")
    return {
        "prompt": _with_system([{"role": "user", "content": prompt}], system),
        "chosen": _get(rec, c, "chosen"),
        "rejected": _get(rec, c, "rejected"),
    }


ADAPTERS: dict[str, Callable[..., dict]] = {
    "alpaca": alpaca,
    "dolly": dolly,
    "completion": completion,
    "sharegpt": sharegpt,
    "messages": messages,
    "text": text,
    "seq2seq": seq2seq,
    "preference": preference,
}


def kind_of(example: Mapping) -> str:
    """``"chat"``, ``"text"``, ``"seq2seq"`` or ``"preference"`` for a canonical example."""
    if "chosen" in example:
        return "preference"
    if "messages" in example:
        return "chat"
    if "source" in example:
        return "seq2seq"
    return "text"
