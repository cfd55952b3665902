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
BOS starts each sequence whatever the text holds (:func:`one_bos`). Labels are *not* shifted
(the model shifts them). Over-long conversations are shortened in their message contents,
never in the template's structure (:func:`shorten_messages`).
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

    @property
    def uses_bos(self) -> bool:
        """Whether sequences start with one BOS (added by the tokenizer or the template)."""
        return self.bos_id is not None and (self.add_bos or self.bos_in_template)


def one_bos(ids: list[int], labels: list[int], info: TemplateInfo) -> tuple[list[int], list[int]]:
    """Exactly one BOS at the start of ``ids`` when the model uses one, else none.

    BOS ids the text itself starts with (raw text that begins with ``<s>``, a template that
    emits ``{{ bos_token }}``, a first message that begins with it) are removed before the
    single BOS is put back, so no sequence starts with two. The BOS is never trained.
    """
    bos = info.bos_id
    if bos is None:
        return ids, labels
    k = 0
    while k < len(ids) and ids[k] == bos:
        k += 1
    ids, labels = ids[k:], labels[k:]
    if info.uses_bos:
        ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
    return ids, labels


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

    Every assistant turn is trainable (multi-turn; tool calls included) unless the message has
    ``"train": False`` (LLaMA-Factory v1 ``loss_weight: 0``, axolotl
    ``message_field_training``); turns after the last
    assistant turn are dropped. A response the template does not end with a stop token gets the
    EOS appended. ``tools`` (function schemas) is passed to the template on every render.

    An untrained turn that the template renders differently once the conversation goes on
    (Qwen3 strips ``<think>...</think>`` from assistant turns before the last user turn) is
    context only: it becomes part of the next prompt segment, as the template renders it there.

    Raises:
        TemplateRenderError: the template is not prefix-stable for a trained turn of this
            conversation (a family plugin can split such conversations: ``plugtune_chat_rows``).
    """
    segments: list[tuple[str, bool]] = []
    prev = ""  # the template's own rendering so far (before any appended EOS)
    stop_strings = [s for s in (info.end_of_turn, info.eos_token) if s]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = {i: _render(tokenizer, messages[:i], True, tools) if i else "" for i in turns}
    for n, i in enumerate(turns):
        m = messages[i]
        prompt = prompts[i]
        full = _render(tokenizer, messages[: i + 1], False, tools)
        if m.get("train") is False and n + 1 < len(turns) and not prompts[turns[n + 1]].startswith(full):
            continue  # context re-rendered by the template: part of the next prompt segment
        if not prompt.startswith(prev) or not full.startswith(prompt):
            raise TemplateRenderError(
                f"chat template is not prefix-stable at turn {i}: cannot split prompt and "
                "response; a family plugin may split such conversations (plugtune_chat_rows; "
                "`plugtune families` lists what is installed), or choose a named template "
                "(chat_template: chatml | alpaca | ...)")
        resp = full[len(prompt):]
        body = resp.rstrip()
        trailing = resp[len(body):]
        if info.eos_token and not any(body.endswith(s) for s in stop_strings):
            # the template emits no stop token after this turn: append EOS so generation stops
            body += info.eos_token
        segments.append((prompt[len(prev):], train_on_inputs))
        segments.append((body, m.get("train") is not False))  # train: False = context only
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
    ids, labels = one_bos(list(ids), labels, info)
    return ids, labels


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


def _encode_chat(tokenizer, messages: list[dict], info: TemplateInfo, train_on_inputs: bool,
                 tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    return tokenize_segments(
        tokenizer, render_segments(tokenizer, messages, info, train_on_inputs, tools), info)


def cut_text_end(tokenizer, text: str, n_tokens: int) -> str:
    """``text`` without its last ``n_tokens`` tokens (cut at a token's first character)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    keep = len(offsets) - n_tokens
    if keep <= 0:
        return ""
    return text[: offsets[keep][0]].rstrip()


def shorten_messages(tokenizer, messages: list[dict], info: TemplateInfo, max_len: int,
                     train_on_inputs: bool = False, tools: list[dict] | None = None
                     ) -> tuple[list[int], list[int]] | None:
    """Fit a conversation into ``max_len`` tokens by shortening what the user wrote.

    The template's structural tokens (BOS, ``<|im_start|>``, ``[INST]`` ...) and the system
    prompt are never cut: the conversation is re-rendered after each step.

    1. the oldest turns (each user turn with the assistant answer that follows it) are dropped
       while more than the last answered turn remains;
    2. then the end of the first remaining user message's text is cut (its beginning, usually
       the instruction, stays; as LLaMA-Factory truncates the source from its end).

    Returns:
        ``(input_ids, labels)`` that fit, or ``None`` when even an empty first user message
        leaves the rest (system prompt, the last answer) longer than ``max_len``.
    """
    msgs = [dict(m) for m in messages]
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys]["role"] == "system":
        n_sys += 1
    ids, labels = _encode_chat(tokenizer, msgs, info, train_on_inputs, tools)
    # 1. drop the oldest turns while another answered turn remains after them
    while len(ids) > max_len:
        rest = msgs[n_sys:]
        first_answer = next((i for i, m in enumerate(rest) if m["role"] == "assistant"), None)
        if first_answer is None or not any(m["role"] == "assistant" for m in rest[first_answer + 1:]):
            break
        rest = rest[first_answer + 1:]
        while rest and rest[0]["role"] == "tool":  # a dropped tool call's results go with it
            rest = rest[1:]
        msgs = msgs[:n_sys] + rest
        ids, labels = _encode_chat(tokenizer, msgs, info, train_on_inputs, tools)
    # 2. cut the end of the first user message's text
    user = next((i for i in range(n_sys, len(msgs)) if msgs[i]["role"] == "user"), None)
    for _ in range(8):  # token merges at the cut can leave a token or two over: retry
        if len(ids) <= max_len:
            return ids, labels
        if user is None or not msgs[user]["content"]:
            return None
        msgs[user] = {**msgs[user], "content": cut_text_end(
            tokenizer, msgs[user]["content"], len(ids) - max_len)}
        ids, labels = _encode_chat(tokenizer, msgs, info, train_on_inputs, tools)
    return (ids, labels) if len(ids) <= max_len else None


def tokenize_chat(tokenizer, messages: list[dict], info: TemplateInfo, max_len: int,
                  train_on_inputs: bool = False, policy: str = "prompt_then_drop",
                  tools: list[dict] | None = None) -> dict:
    """One chat example -> ``{"input_ids", "labels", "length", "status", "cut_tokens"}``.

    Over ``max_len``: ``prompt_then_drop`` shortens the messages (:func:`shorten_messages`;
    ``cut_tokens`` says by how many tokens) and drops the sample when that cannot fit it;
    ``drop`` drops it. ``tools`` (function schemas) go to the template on every render.
    """
    ids, labels = _encode_chat(tokenizer, messages, info, train_on_inputs, tools)
    n, status = len(ids), "kept"
    if n > max_len:
        fitted = (shorten_messages(tokenizer, messages, info, max_len, train_on_inputs, tools)
                  if policy == "prompt_then_drop" else None)
        ids, labels, status = (*fitted, "truncated") if fitted else ([], [], "dropped")
    return {"input_ids": ids, "labels": labels, "length": len(ids), "status": status,
            "cut_tokens": n - len(ids) if status == "truncated" else 0}


def rows_as_rendered(tokenizer, messages: list[dict], tools: list[dict] | None = None
                     ) -> list[list[dict]]:
    """Split a conversation into rows in which every trained turn is what the template renders
    when that turn is the one being generated.

    For templates that rewrite history (Qwen3 strips ``<think>...</think>`` from assistant turns
    before the last user turn): when the model answers turn *k* it sees the earlier turns as the
    template renders them *then*, so each trained turn is trained on that view; turns the
    template never rewrites share a row. Used by :func:`tokenize_chat_rows` whenever one row is
    not prefix-stable, and by family plugins (``plugtune_chat_rows``, e.g. plugtune-qwen3).

    A trained assistant turn *i* (no ``"train": False``) can be trained in the row that ends
    with turn *e* when ``render(messages[:i+1])`` is a prefix of ``render(messages[:e+1])``:
    the row then holds turn *i* exactly as it is rendered as the last turn. Rows are built from
    the last trained turn backwards; every turn goes into the row of the latest turn that can
    hold it. In a row, the other assistant turns are marked ``"train": False`` (context).

    Returns:
        Message lists in conversation order (one, the conversation itself, when the template
        never rewrites an earlier turn or nothing is trained). Costs one extra render per
        trained turn.
    """
    trained = [i for i, m in enumerate(messages)
               if m.get("role") == "assistant" and m.get("train") is not False]
    if not trained:
        return [messages]
    as_last = {i: _render(tokenizer, messages[: i + 1], False, tools) for i in trained}
    rows: list[list[dict]] = []
    left = list(trained)
    while left:
        end = left[-1]
        here = {i for i in left if as_last[end].startswith(as_last[i])}
        rows.append([dict(m, train=False) if i in trained and i not in here else m
                     for i, m in enumerate(messages[: end + 1])])
        left = [i for i in left if i not in here]
    rows.reverse()
    if len(rows) == 1 and len(rows[0]) == len(messages):
        return [messages]
    return rows


def tokenize_chat_rows(tokenizer, messages: list[dict], info: TemplateInfo, max_len: int,
                       train_on_inputs: bool = False, policy: str = "prompt_then_drop",
                       tools: list[dict] | None = None) -> list[dict]:
    """:func:`tokenize_chat` of one conversation as one row; when the template rewrites an
    earlier trained turn later on (not prefix-stable, e.g. Qwen3's reasoning stripping on the
    generic route), the rows of :func:`rows_as_rendered` instead: one per view the template
    forces, each turn trained exactly as the template renders it when generated.

    Raises:
        TemplateRenderError: not even the split rows can be rendered turn by turn (a template
            that changes a turn's own text between renders); the message says what to do.
    """
    try:
        return [tokenize_chat(tokenizer, messages, info, max_len, train_on_inputs, policy, tools)]
    except TemplateRenderError:
        convs = rows_as_rendered(tokenizer, messages, tools)
        if len(convs) == 1:
            raise
    return [tokenize_chat(tokenizer, c, info, max_len, train_on_inputs, policy, tools)
            for c in convs]


def tokenize_text(tokenizer, text: str, max_len: int, info: TemplateInfo) -> list[dict]:
    """Raw text -> BOS + text + EOS, cut into ``max_len`` windows; every token trained.

    A BOS the text already starts with (Llama-2-formatted text) is not doubled
    (:func:`one_bos`). A text with no token of its own gives one row of status ``"empty"``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, _ = one_bos(list(ids), list(ids), info)
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    out = []
    for start in range(0, len(ids), max_len):
        chunk = ids[start: start + max_len]
        if len(chunk) < 2:
            continue
        out.append({"input_ids": chunk, "labels": list(chunk), "length": len(chunk),
                    "status": "kept" if start == 0 else "chunked", "cut_tokens": 0})
    if not out:
        out.append({"input_ids": ids, "labels": list(ids), "length": len(ids), "status": "empty",
                    "cut_tokens": 0})
    return out


def tokenize_seq2seq(tokenizer, source: str, target: str, max_len: int,
                     max_target_len: int | None = None) -> dict:
    """Encoder-decoder example: ``input_ids`` from the source, ``labels`` from the target.

    The tokenizer adds its EOS to both (T5 does). The source is truncated to ``max_len`` tokens
    (counted as truncated); the target to ``max_target_len`` (default ``max_len``).
    """
    src = tokenizer(source, truncation=False)["input_ids"]
    tgt = tokenizer(text_target=target, truncation=False)["input_ids"]
    status, cut = "kept", 0
    if len(src) > max_len:
        cut += len(src) - max_len
        src = src[: max_len - 1] + src[-1:]
        status = "truncated"
    limit = max_target_len or max_len
    if len(tgt) > limit:
        cut += len(tgt) - limit
        tgt = tgt[: limit - 1] + tgt[-1:]
        status = "truncated"
    return {"input_ids": src, "labels": tgt, "length": len(src), "status": status,
            "cut_tokens": cut}
