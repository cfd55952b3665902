"""Format adapters: one raw record -> one canonical example.

Canonical examples (plain dicts, so ``datasets.map`` can carry them):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (alpaca, dolly, sharegpt, messages, completion),
* ``{"text": str}`` (raw text, unsupervised causal-LM fine-tuning),
* ``{"source": str, "target": str}`` (seq2seq, e.g. SAMSum dialogue -> summary),
* ``{"prompt": [messages], "chosen": str, "rejected": str}`` (preference pairs, DPO),
* vision chat: ``{"messages": [...], "images": [absolute image paths]}`` whose message
  contents hold one :data:`IMAGE_PLACEHOLDER` per image, in order (``type: vision``).

Every adapter raises :class:`BadRecord` naming the field and what was expected; the loader adds
the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    """``source`` / ``target`` (SAMSum: ``columns: {source: dialogue, target: summary}``).

    An encoder-decoder has no system turn: ``system_prompt`` becomes the task prefix of the
    source, T5 style (``system_prompt: "summarize:"`` gives ``"summarize: <dialogue>"``; Raffel
    et al. 2020, and the FLAN-T5 SAMSum recipes), see :func:`with_task_prefix`."""
    return {"source": with_task_prefix(_get(rec, cols, "source"), system),
            "target": _get(rec, cols, "target")}


def with_task_prefix(source: str, prefix: str | None) -> str:
    """``prefix`` + ``source``, separated by one space unless ``prefix`` already ends in
    whitespace (``"summarize:"`` -> ``"summarize: text"``, ``"Summarize:\n"`` -> as is);
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
        return _distinct_pair({"prompt": _with_system(prompt, system), **out}, c)
    if "question" in rec and "response_j" in rec:
        c.setdefault("prompt", "question")
        c.setdefault("chosen", "response_j")
        c.setdefault("rejected", "response_k")
    prompt = _get(rec, c, "prompt")
    out = {
        "prompt": _with_system([{"role": "user", "content": prompt}], system),
        "chosen": _get(rec, c, "chosen"),
        "rejected": _get(rec, c, "rejected"),
    }
    return _distinct_pair(out, c)


def _distinct_pair(pair: dict, cols: Mapping[str, str]) -> dict:
    """``pair`` unchanged, or :class:`BadRecord` when its chosen and rejected answers are the
    same text (DPO's loss is then zero: the pair teaches nothing)."""
    if pair["chosen"] == pair["rejected"]:
        raise BadRecord(cols.get("rejected", "rejected"),
                        "is identical to chosen; a preference pair needs two different answers")
    return pair


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
           base_dir: str | Path | None = None) -> dict:
    """Images + chat, in three layouts detected per record.

    * ``messages`` (role/content) + ``images``: LLaMA-Factory's ``mllm_demo.json`` layout; each
      ``<image>`` in the message texts stands for the next path of ``images``;
    * ``conversations`` (ShareGPT from/value) + ``images``: the same with ShareGPT turns;
    * ``image`` + ``caption`` (+ optional ``prompt``): an image/caption pair becomes
      ``user: <image>{prompt}`` / ``assistant: {caption}`` (default prompt
      :data:`CAPTION_PROMPT`).

    A record without ``images`` (or with an empty list) is a text-only sample. Relative image
    paths are resolved against ``base_dir`` (the dataset's ``image_dir``, else its folder) and
    each file is checked with Pillow, so a missing or unreadable image names the record and
    the path. The number of ``<image>`` placeholders must equal the number of images.
    """
    c = dict(cols)
    img_key, cap_key = c.get("image", "image"), c.get("caption", "caption")
    if c.get("messages", "messages") in rec:
        msgs = messages(rec, cols, system)["messages"]
    elif c.get("conversations", "conversations") in rec:
        msgs = sharegpt(rec, cols, system)["messages"]
    elif img_key in rec and cap_key in rec:
        prompt = _get(rec, c, "prompt", required=False) or CAPTION_PROMPT
        caption = _get(rec, c, "caption")
        msgs = _with_system([{"role": "user", "content": IMAGE_PLACEHOLDER + prompt},
                             {"role": "assistant", "content": caption}], system)
        return {"messages": msgs, "images": [_image_path(rec[img_key], img_key, base_dir)]}
    else:
        raise BadRecord(c.get("messages", "messages"),
                        "missing: a vision record has messages (or conversations) + images, "
                        f"or image + caption (columns present: {', '.join(map(str, rec))})")
    key = c.get("images", "images")
    raw = rec.get(key)
    if raw is None:
        raw = []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise BadRecord(key, f"expected a list of image paths, got {type(raw).__name__}")
    images = [_image_path(v, f"{key}[{i}]", base_dir) for i, v in enumerate(raw)]
    n_tags = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    if n_tags != len(images):
        raise BadRecord(key, f"{len(images)} image(s) but {n_tags} {IMAGE_PLACEHOLDER} "
                        "placeholder(s) in the messages; put one placeholder per image")
    return {"messages": msgs, "images": images}


def vision_features():
    """``datasets.Features`` of canonical vision examples (fixed, so text-only and image
    samples mix: an all-empty ``images`` batch would otherwise be typed ``null``)."""
    import datasets

    return datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.Value("string")}),
        "images": datasets.List(datasets.Value("string")),
    })


ADAPTERS: dict[str, Callable[..., dict]] = {
    "alpaca": alpaca,
    "dolly": dolly,
    "completion": completion,
    "sharegpt": sharegpt,
    "messages": messages,
    "text": text,
    "seq2seq": seq2seq,
    "preference": preference,
    "vision": vision,
}


#: what each dataset ``type``'s adapter produces (see :func:`kind_of`)
KINDS = {"alpaca": "chat", "dolly": "chat", "completion": "chat", "sharegpt": "chat",
         "messages": "chat", "vision": "chat", "seq2seq": "seq2seq", "text": "text",
         "preference": "preference"}


def kind_of(example: Mapping) -> str:
    """``"chat"``, ``"text"``, ``"seq2seq"`` or ``"preference"`` for a canonical example."""
    if "chosen" in example:
        return "preference"
    if "messages" in example:
        return "chat"
    if "source" in example:
        return "seq2seq"
    return "text"
