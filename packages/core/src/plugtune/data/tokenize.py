"""Prompt rendering, tokenization, label masking and the length policy.

Label masks come from the *segment boundaries of the rendered template*, never from searching
token ids for a response marker (which breaks when tokenization depends on context):

1. the conversation is rendered turn by turn with ``tokenizer.apply_chat_template``; the text
   added by each assistant turn (``render(msgs[:i+1])`` minus ``render(msgs[:i], add_generation_prompt=True)``)
   is a trainable character span;
2. the whole text is tokenized once (``return_offsets_mapping``), so tokens are exactly what the
   model sees at inference, and a token is trained when its first character lies in a
   trainable span.

Every trained response ends with a stop token (EOS, or the template's end-of-turn token such as
``<|im_end|>`` / ``<|eot_id|>``): if the template does not emit one, EOS is appended. Exactly one
BOS starts each sequence. Labels are *not* shifted (the model shifts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100  # ignored by torch.nn.CrossEntropyLoss (its default ignore_index)
_PROBE = "PLUGTUNE_PROBE_RESPONSE"


class TemplateRenderError(ValueError):
    """The chat template cannot be split into prompt and response segments."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` prepends a BOS (Llama, Mistral; not Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass
class TemplateInfo:
    """What the tokenizer's template does, probed once per run.

    Attributes:
        stop_token_ids: ids that end an assistant turn (EOS and the end-of-turn token, if any);
            pass them to ``generate(eos_token_id=...)``.
        end_of_turn: the end-of-turn token string the template emits after a response, or
            ``None`` when the template emits none (then EOS is appended to responses).
        bos_in_template: whether rendered text already starts with the BOS string.
        add_bos: whether a BOS id must be prepended to the tokenized text.
    """

    stop_token_ids: list[int]
    end_of_turn: str | None
    bos_in_template: bool
    add_bos: bool
    bos_id: int | None = None
    eos_token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def probe_template(tokenizer) -> TemplateInfo:
    """Probe the chat template with a one-turn conversation (see :class:`TemplateInfo`)."""
    msgs = [{"role": "user", "content": "hi"}]
    prompt = _render(tokenizer, msgs, True)
    full = _render(tokenizer, [*msgs, {"role": "assistant", "content": _PROBE}], False)
    if not full.startswith(prompt) or _PROBE not in full:
        raise TemplateRenderError(
            "the chat template is not prefix-stable: rendering the prompt with "
            "add_generation_prompt=True is not a prefix of prompt + response; choose a named "
            "template (chat_template: chatml | alpaca | ...)")
    tail = full[full.index(_PROBE) + len(_PROBE):].strip()
    special = set(tokenizer.all_special_tokens) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {})
    eot = None
    for tok in sorted(special, key=len, reverse=True):
        if tok and tail.startswith(tok):
            eot = tok
            break
    stops: list[int] = []
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    if eot is not None:
        tid = tokenizer.convert_tokens_to_ids(eot)
        if tid is not None and tid not in stops:
            stops.append(tid)
    bos = tokenizer.bos_token
    bos_in_template = bool(bos) and prompt.startswith(bos)
    return TemplateInfo(
        stop_token_ids=stops,
        end_of_turn=eot,
        bos_in_template=bos_in_template,
        add_bos=adds_bos(tokenizer) and not bos_in_template,
        bos_id=tokenizer.bos_token_id,
        eos_token=tokenizer.eos_token,
    )


def render_segments(tokenizer, messages: list[dict], info: TemplateInfo,
                    train_on_inputs: bool = False, tools: list[dict] | None = None
                    ) -> list[tuple[str, bool]]:
    """Render a conversation into ``[(text, trainable), ...]`` whose concatenation is the prompt.

    Every assistant turn is trainable (multi-turn; tool calls included); turns after the last
    assistant turn are dropped. A response the template does not end with a stop token gets the
    EOS appended. ``tools`` (function schemas) is passed to the template on every render.

    Raises:
        TemplateRenderError: the template is not prefix-stable for this conversation.
    """
    segments: list[tuple[str, bool]] = []
    prev = ""  # the template's own rendering so far (before any appended EOS)
    stop_strings = [s for s in (info.end_of_turn, info.eos_token) if s]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, tools) if i else ""
        full = _render(tokenizer, messages[: i + 1], False, tools)
        if not prompt.startswith(prev) or not full.startswith(prompt):
            raise TemplateRenderError(
                f"chat template is not prefix-stable at turn {i}: cannot split prompt and "
                "response; choose a named template (chat_template: chatml | alpaca | ...)")
        resp = full[len(prompt):]
        body = resp.rstrip()
        trailing = resp[len(body):]
        if info.eos_token and not any(body.endswith(s) for s in stop_strings):
            # the template emits no stop token after this turn: append EOS so generation stops
            body += info.eos_token
        segments.append((prompt[len(prev):], train_on_inputs))
        segments.append((body, True))
        if trailing:
            segments.append((trailing, train_on_inputs))
        prev = full
    if not segments:
        raise TemplateRenderError("conversation has no assistant turn to train on")
    return segments


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], info: TemplateInfo
                      ) -> tuple[list[int], list[int]]:
    """Tokenize rendered segments once, as one text, and derive labels from char offsets.

    Returns:
        ``(input_ids, labels)``, equal length; labels are ``-100`` outside trainable spans.
    """
    text = "".join(s for s, _ in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans, pos = [], 0
    for s, train in segments:
        if train:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    labels = []
    for tid, (start, _end) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(tid if inside else IGNORE_INDEX)
    if info.add_bos and info.bos_id is not None:
        ids = [info.bos_id, *ids]
        labels = [IGNORE_INDEX, *labels]
    return list(ids), labels


@dataclass
class LengthStats:
    """Counts from the length policy (samples, not tokens)."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0


def apply_length_policy(ids: list[int], labels: list[int], max_len: int, policy: str,
                        keep_prefix: int) -> tuple[list[int], list[int], str]:
    """Fit one sample into ``max_len`` tokens without losing its whole response.

    ``prompt_then_drop`` removes prompt tokens from the left (after the ``keep_prefix`` BOS
    tokens) up to the first trained token; if that is not enough the sample is dropped.
    ``drop`` drops every over-long sample.

    Returns:
        ``(ids, labels, status)`` with status ``"kept"``, ``"truncated"`` or ``"dropped"``.
    """
    n = len(ids)
    if n <= max_len:
        return ids, labels, "kept"
    if policy == "prompt_then_drop":
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), n)
        excess = n - max_len
        if first - keep_prefix >= excess:
            cut = slice(keep_prefix, keep_prefix + excess)
            ids = ids[: cut.start] + ids[cut.stop:]
            labels = labels[: cut.start] + labels[cut.stop:]
            return ids, labels, "truncated"
    return [], [], "dropped"


def tokenize_chat(tokenizer, messages: list[dict], info: TemplateInfo, max_len: int,
                  train_on_inputs: bool = False, policy: str = "prompt_then_drop",
                  tools: list[dict] | None = None) -> dict:
    """One chat example -> ``{"input_ids", "labels", "length", "status"}``."""
    segs = render_segments(tokenizer, messages, info, train_on_inputs, tools)
    ids, labels = tokenize_segments(tokenizer, segs, info)
    keep = 1 if ids and info.bos_id is not None and ids[0] == info.bos_id else 0
    ids, labels, status = apply_length_policy(ids, labels, max_len, policy, keep)
    return {"input_ids": ids, "labels": labels, "length": len(ids), "status": status}


def tokenize_text(tokenizer, text: str, max_len: int, info: TemplateInfo) -> list[dict]:
    """Raw text -> BOS + text + EOS, cut into ``max_len`` windows; every token trained."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if info.bos_id is not None and (info.add_bos or info.bos_in_template):
        ids = [info.bos_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    out = []
    for start in range(0, len(ids), max_len):
        chunk = ids[start: start + max_len]
        if len(chunk) < 2:
            continue
        out.append({"input_ids": chunk, "labels": list(chunk), "length": len(chunk),
                    "status": "kept" if start == 0 else "chunked"})
    return out


def tokenize_seq2seq(tokenizer, source: str, target: str, max_len: int,
                     max_target_len: int | None = None) -> dict:
    """Encoder-decoder example: ``input_ids`` from the source, ``labels`` from the target.

    The tokenizer adds its EOS to both (T5 does). The source is truncated to ``max_len`` tokens
    (counted as truncated); the target to ``max_target_len`` (default ``max_len``).
    """
    src = tokenizer(source, truncation=False)["input_ids"]
    tgt = tokenizer(text_target=target, truncation=False)["input_ids"]
    status = "kept"
    if len(src) > max_len:
        src = src[: max_len - 1] + src[-1:]
        status = "truncated"
    limit = max_target_len or max_len
    if len(tgt) > limit:
        tgt = tgt[: limit - 1] + tgt[-1:]
        status = "truncated"
    return {"input_ids": src, "labels": tgt, "length": len(src), "status": status}
