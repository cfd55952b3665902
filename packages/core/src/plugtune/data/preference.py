"""Preference pairs -> token ids, shared by every pair method (DPO and its variants, ORPO,
CPO/SimPO, reward models).

The canonical preference example is ``{"prompt": [messages], "chosen": str, "rejected": str}``
(:func:`plugtune.data.formats.preference`). The pairs are tokenized with the same rendering as
SFT (:func:`plugtune.data.tokenize.render_segments`), as pre-tokenized ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids`` for TRL's trainers:

* the chat template is applied once, to ``prompt + [assistant answer]``; the answer is the text
  the template adds after the generation prompt, ending with the template's stop token (EOS is
  appended when the template emits none), exactly as in SFT;
* ``prompt + answer`` is tokenized as one text (so the tokens are those the model sees at
  inference) and split where it stops agreeing with the tokenized prompt; the split is the same
  for chosen and rejected (the shorter common prefix of both), so ``prompt_ids`` is shared;
* exactly one BOS starts each sequence (only when the tokenizer adds one and the template does
  not already); chosen and rejected never start with a BOS of their own;
* the length policy cuts the prompt from the left (keeping the BOS) down to at least half of
  ``sequence_len``, then cuts the answers from the right.
"""

from __future__ import annotations

import datasets

from plugtune.data.loading import DataError
from plugtune.data.tokenize import (
    TemplateInfo,
    TemplateRenderError,
    cut_text_end,
    one_bos,
    render_segments,
)


def render_pair(tokenizer, info: TemplateInfo, prompt: list[dict], answer: str) -> tuple[str, str]:
    """Render ``prompt + [assistant answer]`` once and split it into ``(prompt_text, answer_text)``.

    ``prompt_text`` ends with the generation prompt (e.g. ``<|assistant|>\\n``); ``answer_text``
    ends with the stop token (EOS or end-of-turn). Whitespace the template writes after the stop
    token is dropped (nothing after the stop token is scored).

    Raises:
        TemplateRenderError: the template is not prefix-stable, or the prompt ends with an
            assistant turn.
    """
    if not prompt or prompt[-1]["role"] == "assistant":
        raise TemplateRenderError("a preference prompt must end with a user (or system) turn")
    segs = render_segments(tokenizer, [*prompt, {"role": "assistant", "content": answer}], info)
    last = max(i for i, (_, trainable) in enumerate(segs) if trainable)
    return "".join(s for s, _ in segs[:last]), segs[last][0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, info: TemplateInfo, prompt: list[dict], chosen: str, rejected: str,
                  max_len: int) -> dict:
    """One preference pair -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints).

    ``prompt_ids + chosen_ids`` is the tokenization of the rendered ``prompt + chosen`` text
    (likewise for rejected), with exactly one BOS in front when the model uses one
    (:func:`plugtune.data.tokenize.one_bos`).

    Returns:
        The three id lists, ``length`` (prompt + longer answer, in tokens), ``status``
        (``"kept"`` / ``"truncated"``) and ``boundary_shift`` (prompt tokens that merged into the
        answers at the boundary; usually 0).
    """
    prompt_ids, chosen_ids, rejected_ids, shift = _split_pair(tokenizer, info, prompt, chosen, rejected)
    keep = 1 if info.uses_bos else 0
    status = "kept"
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest > max_len:
        status = "truncated"
        room = max(max_len - longest, min(len(prompt_ids), max_len // 2))
        msgs = [dict(m) for m in prompt]
        n_sys = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
        # shorten the messages, never the template's structure or the system prompt (as
        # plugtune.data.tokenize.shorten_messages): oldest turns first, then the end of the
        # first user message's text
        for _ in range(len(msgs) + 8):
            if len(prompt_ids) <= room:
                break
            rest = msgs[n_sys:]
            answer = next((i for i, m in enumerate(rest) if m["role"] == "assistant"), None)
            if answer is not None and any(m["role"] == "user" for m in rest[answer + 1:]):
                msgs = msgs[:n_sys] + rest[answer + 1:]
            else:
                user = next((i for i in range(n_sys, len(msgs)) if msgs[i]["role"] == "user"), None)
                if user is None or not msgs[user]["content"]:
                    break
                msgs[user] = {**msgs[user], "content": cut_text_end(
                    tokenizer, msgs[user]["content"], len(prompt_ids) - room)}
            prompt_ids, chosen_ids, rejected_ids, shift = _split_pair(tokenizer, info, msgs, chosen,
                                                                      rejected)
        if len(prompt_ids) > room:  # last resort: cut the prompt from the left, keep the BOS
            prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - (room - keep):]
        budget = max(1, max_len - len(prompt_ids))
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)),
            "status": status, "boundary_shift": shift}


def _split_pair(tokenizer, info: TemplateInfo, prompt: list[dict], chosen: str, rejected: str
                ) -> tuple[list[int], list[int], list[int], int]:
    """``(prompt_ids, chosen_ids, rejected_ids, boundary_shift)`` of one rendered pair."""
    p_text, c_text = render_pair(tokenizer, info, prompt, chosen)
    p_text2, r_text = render_pair(tokenizer, info, prompt, rejected)
    if p_text != p_text2:  # cannot happen with a deterministic template; guard the invariant
        raise TemplateRenderError("the chat template renders the same prompt differently")
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, pc_ids, pr_ids = enc(p_text), enc(p_text + c_text), enc(p_text + r_text)
    n = min(_common_prefix(p_ids, pc_ids), _common_prefix(p_ids, pr_ids))
    prompt_ids, chosen_ids, rejected_ids = pc_ids[:n], pc_ids[n:], pr_ids[n:]
    prompt_ids, _ = one_bos(prompt_ids, list(prompt_ids), info)  # a BOS the text holds is not doubled
    return prompt_ids, chosen_ids, rejected_ids, len(p_ids) - n


def tokenize_preferences(ds: datasets.Dataset, tokenizer, info: TemplateInfo, max_len: int
                         ) -> tuple[datasets.Dataset, dict]:
    """Tokenize canonical preference examples (see :func:`tokenize_pair`) with ``datasets.map``.

    Returns:
        ``(rows, stats)``; rows carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
        ``length``; stats count ``pairs``, ``truncated``, ``boundary_shifted`` and mean lengths.

    Raises:
        DataError: a pair whose chosen and rejected answers are identical, or a template that
            cannot be split (record index named).
    """
    def fn(ex: dict, idx: int) -> dict:
        if ex["chosen"] == ex["rejected"]:
            raise DataError(f"preference record {idx}: chosen and rejected are identical")
        try:
            return tokenize_pair(tokenizer, info, ex["prompt"], ex["chosen"], ex["rejected"], max_len)
        except TemplateRenderError as exc:
            raise DataError(f"preference record {idx}: {exc}") from exc

    rows = ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc="tokenize pairs")
    status = rows["status"]
    n = max(len(rows), 1)
    stats = {
        "pairs": len(rows),
        "truncated": status.count("truncated"),
        "boundary_shifted": sum(1 for b in rows["boundary_shift"] if b),
        "mean_prompt_tokens": round(sum(map(len, rows["prompt_ids"])) / n, 1),
        "mean_chosen_tokens": round(sum(map(len, rows["chosen_ids"])) / n, 1),
        "mean_rejected_tokens": round(sum(map(len, rows["rejected_ids"])) / n, 1),
    }
    return rows.remove_columns(["status", "boundary_shift"]), stats
