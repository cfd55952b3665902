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
* exactly one BOS starts each sequence (added by the tokenizer or written by the template,
  never doubled); chosen and rejected never start with a BOS of their own;
* the length policy shortens the prompt where the user wrote (oldest turns, then the end of
  the first user message), re-rendering it, so the BOS, the template's structure and the
  system prompt stay; then it cuts the answers from the right.

KTO's unpaired rows (``{"prompt", "completion", "label"}``) go through the same rendering.
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


def _encode_answers(tokenizer, info: TemplateInfo, prompt: list[dict], answers: list[str]
                    ) -> tuple[list[int], list[list[int]], int]:
    """Render and tokenize ``prompt + [answer]`` for every answer, split at the shared prompt
    boundary; one BOS in front of the prompt (:func:`plugtune.data.tokenize.one_bos`)."""
    texts = [render_pair(tokenizer, info, prompt, a) for a in answers]
    p_text = texts[0][0]
    if any(t[0] != p_text for t in texts):  # cannot happen with a deterministic template
        raise TemplateRenderError("the chat template renders the same prompt differently")
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids = enc(p_text)
    fulls = [enc(p_text + a_text) for _, a_text in texts]
    n = min(_common_prefix(p_ids, f) for f in fulls)
    prompt_ids, _ = one_bos(list(fulls[0][:n]), list(fulls[0][:n]), info)
    return prompt_ids, [f[n:] for f in fulls], len(p_ids) - n


def _shorter_prompt(tokenizer, prompt: list[dict], n_tokens: int) -> list[dict] | None:
    """``prompt`` about ``n_tokens`` shorter, cut where the user wrote, never in the template's
    structure or the system prompt: the oldest turns go first (while a user turn remains after
    them), then the end of the first user message's text. ``None`` when nothing is left to
    cut."""
    msgs = [dict(m) for m in prompt]
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys]["role"] == "system":
        n_sys += 1
    rest = msgs[n_sys:]
    answer = next((i for i, m in enumerate(rest) if m["role"] == "assistant"), None)
    if answer is not None and any(m["role"] == "user" for m in rest[answer + 1:]):
        return msgs[:n_sys] + rest[answer + 1:]
    user = next((i for i in range(n_sys, len(msgs)) if msgs[i]["role"] == "user"), None)
    if user is None or not msgs[user]["content"]:
        return None
    msgs[user]["content"] = cut_text_end(tokenizer, msgs[user]["content"], max(1, n_tokens))
    return msgs


def tokenize_answers(tokenizer, info: TemplateInfo, prompt: list[dict], answers: list[str],
                     max_len: int) -> dict:
    """A prompt and one or more answers -> ``prompt_ids`` and one id list per answer.

    ``prompt_ids + answer_ids[i]`` is the tokenization of the rendered ``prompt + answer``
    text, with exactly one BOS in front when the model uses one (added by the tokenizer or
    written by the template, never doubled); the split is the same for every answer, so
    ``prompt_ids`` is shared, and each answer ends with the template's stop token.

    Length policy (``max_len`` tokens for the prompt plus the longest answer): the prompt is
    shortened where the user wrote (:func:`_shorter_prompt`: oldest turns, then the end of the
    first user message), re-rendered each time, so the BOS, the template's structure and the
    system prompt stay; it is not cut below half of ``max_len`` (or its own length). Answers
    still too long are then cut from the right.

    Returns:
        ``prompt_ids``, ``answer_ids`` (list of lists), ``length`` (prompt + longest answer),
        ``status`` (``"kept"`` / ``"truncated"``), ``boundary_shift`` (prompt tokens that merged
        into the answers at the boundary; usually 0) and ``cut_tokens``.

    Raises:
        TemplateRenderError: the template cannot be split, or the prompt ends with an assistant
            turn.
    """
    prompt_ids, outs, shift = _encode_answers(tokenizer, info, prompt, answers)
    total = len(prompt_ids) + max(map(len, outs))
    if total <= max_len:
        return {"prompt_ids": prompt_ids, "answer_ids": outs, "length": total, "status": "kept",
                "boundary_shift": shift, "cut_tokens": 0}
    longest = max(map(len, outs))
    room = max(max_len - longest, min(len(prompt_ids), max_len // 2))
    msgs = prompt
    for _ in range(16):  # token merges at a cut can leave a token or two over: retry
        if len(prompt_ids) <= room:
            break
        shorter = _shorter_prompt(tokenizer, msgs, len(prompt_ids) - room)
        if shorter is None:
            break
        msgs = shorter
        prompt_ids, outs, shift = _encode_answers(tokenizer, info, msgs, answers)
    if len(prompt_ids) > room:  # a system prompt alone over budget: cut after the BOS
        keep = 1 if info.uses_bos and prompt_ids[:1] == [info.bos_id] else 0
        prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - (room - keep):]
    budget = max(1, max_len - len(prompt_ids))
    outs = [o[:budget] for o in outs]
    length = len(prompt_ids) + max(map(len, outs))
    return {"prompt_ids": prompt_ids, "answer_ids": outs, "length": length, "status": "truncated",
            "boundary_shift": shift, "cut_tokens": max(0, total - length)}


def tokenize_pair(tokenizer, info: TemplateInfo, prompt: list[dict], chosen: str, rejected: str,
                  max_len: int) -> dict:
    """One preference pair -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints),
    ``length``, ``status``, ``boundary_shift`` (see :func:`tokenize_answers`)."""
    row = tokenize_answers(tokenizer, info, prompt, [chosen, rejected], max_len)
    chosen_ids, rejected_ids = row.pop("answer_ids")
    row.pop("cut_tokens")
    return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, **row}


def tokenize_unpaired(ds: datasets.Dataset, tokenizer, info: TemplateInfo, max_len: int
                      ) -> tuple[datasets.Dataset, dict]:
    """Tokenize unpaired examples (KTO: ``{"prompt": [messages], "completion": str, "label":
    bool}``) with the same rendering as pairs (:func:`tokenize_answers`).

    Returns:
        ``(rows, stats)``; rows carry ``prompt_ids``, ``completion_ids``, ``label``, ``length``;
        stats count ``examples``, ``desirable``, ``undesirable``, ``truncated``.

    Raises:
        DataError: a row that cannot be split (record index named), or only one label value.
    """
    def fn(ex: dict, idx: int) -> dict:
        try:
            row = tokenize_answers(tokenizer, info, ex["prompt"], [ex["completion"]], max_len)
        except TemplateRenderError as exc:
            raise DataError(f"unpaired record {idx}: {exc}") from exc
        return {"prompt_ids": row["prompt_ids"], "completion_ids": row["answer_ids"][0],
                "label": bool(ex["label"]), "length": row["length"], "status": row["status"]}

    rows = ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc="tokenize unpaired")
    labels = rows["label"]
    stats = {"examples": len(rows), "desirable": sum(labels),
             "undesirable": len(labels) - sum(labels),
             "truncated": rows["status"].count("truncated")}
    return rows.remove_columns(["status"]), stats


def legacy_pair_row(row: dict) -> dict:
    """A tokenized pair (:func:`tokenize_pair`) in the layout the older TRL pair trainers
    (``trl.experimental`` ORPO and CPO/SimPO) build in their ``tokenize_row``:
    ``prompt_input_ids``, ``{chosen,rejected}_{input_ids,attention_mask,labels}`` (labels
    ``-100`` on the prompt)."""
    p = list(row["prompt_ids"])
    out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for name in ("chosen", "rejected"):
        ids = p + list(row[f"{name}_ids"])
        out[f"{name}_input_ids"] = ids
        out[f"{name}_attention_mask"] = [1] * len(ids)
        out[f"{name}_labels"] = [-100] * len(p) + list(row[f"{name}_ids"])
    return out


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


def held_out_pairs(recipe, tokenizer, task: str, data: str | None = None,
                   dataset_type: str | None = None, max_samples: int | None = None):
    """The tokenized preference pairs ``plugtune eval`` scores a pair-method run on (DPO, IPO,
    reward model): ``data`` (a file read with the recipe's first dataset's ``columns`` and
    ``dataset_type`` or its ``type``) or else the recipe's ``test_datasets``.

    Args:
        recipe: the run's saved :class:`plugtune.config.Recipe`.
        max_samples: keep at most this many pairs per dataset (``None``: all).

    Returns:
        The :func:`tokenize_preferences` rows (``datasets.Dataset`` with prompt/chosen/rejected
        ids, at most ``recipe.sequence_len`` tokens each).

    Raises:
        ValueError: no ``data`` and no ``test_datasets``, or no pair survived tokenization.
        plugtune.data.DataError: the file cannot be read.
    """
    from plugtune.config import DatasetConfig
    from plugtune.data.pipeline import prepare
    from plugtune.data.tokenize import probe_template

    if data:
        test = [DatasetConfig(path=data, type=dataset_type or recipe.datasets[0].type,
                              columns=recipe.datasets[0].columns)]
    elif recipe.test_datasets:
        test = recipe.test_datasets
    else:
        raise ValueError("no --data and the recipe has no test_datasets")
    if max_samples:
        test = [d.model_copy(update={"max_samples": max_samples}) for d in test]
    prepared = prepare(recipe.model_copy(update={"datasets": test, "test_datasets": []}),
                       tokenizer, task)
    rows, _ = tokenize_preferences(prepared.raw_train, tokenizer, probe_template(tokenizer),
                                   recipe.sequence_len)
    if not len(rows):
        raise ValueError("no held-out pairs")
    return rows
