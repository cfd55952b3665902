"""From recipe to training rows: load -> format -> render -> tokenize + mask -> length -> pack.

Tokenization runs in ``datasets.map`` (batched, ``num_proc``), which caches its results between
runs keyed on the data and the function fingerprint.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets

from plugtune.config import Recipe
from plugtune.data.formats import IMAGE_PLACEHOLDER, flatten_tools, kind_of, template_messages
from plugtune.data.loading import DataError, load_datasets
from plugtune.data.packing import pack_dataset
from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import (
    IGNORE_INDEX,
    TemplateInfo,
    probe_template,
    tokenize_chat,
    tokenize_chat_rows,
    tokenize_seq2seq,
    tokenize_text,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Tokenized (and maybe packed) train/eval rows plus what was done to get them.

    Attributes:
        train: rows with ``input_ids``, ``labels``, ``length`` (+ ``position_ids`` if packed).
        eval: the same for evaluation, or ``None``.
        eval_examples: canonical eval examples (``prompt`` messages / ``reference`` text) for
            generation metrics (exact match, ROUGE).
        kind: ``"chat"``, ``"text"``, ``"seq2seq"``, ``"preference"`` or ``"kto"``.
        template: the probed chat template (``None`` for text-free kinds).
        stats: counts: samples, kept, truncated, dropped, rows, real_tokens, pad_fraction ...
        added_tokens: tokens added to the vocabulary (the recipe's ``added_tokens``, the chat
            template's markers); their rows are trained (:mod:`plugtune.token_rows`).
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    eval_examples: list[dict]
    kind: str
    template: TemplateInfo | None
    stats: dict[str, Any] = field(default_factory=dict)
    added_tokens: list[str] = field(default_factory=list)
    raw_train: datasets.Dataset | None = None
    raw_eval: datasets.Dataset | None = None


def _num_proc(recipe: Recipe, n: int) -> int | None:
    if recipe.dataset_num_proc:
        return recipe.dataset_num_proc if n > 1 else None
    return min(4, os.cpu_count() or 1) if n >= 5000 else None


def _seq2seq_view(ex: dict) -> tuple[str, str]:
    if "source" in ex:
        return ex["source"], ex["target"]
    msgs = ex["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    source = "\n\n".join(m["content"] for m in msgs[:last] if m["role"] != "assistant")
    return source, msgs[last]["content"]


def train_on_eos_policy(recipe: Recipe) -> str:
    """The recipe's axolotl ``train_on_eos`` (``turn`` unless its datasets set one; they must
    agree, since mixed datasets are tokenized together).

    Raises:
        DataError: datasets ask for different values.
    """
    values = {d.train_on_eos or "turn" for d in [*recipe.datasets, *recipe.test_datasets]}
    if len(values) > 1:
        raise DataError(f"datasets set different train_on_eos values {sorted(values)}; "
                        "plugtune applies one per run: set the same on every dataset")
    return values.pop()


def apply_train_on_eos(ids: list[int], labels: list[int], stops: list[int], policy: str
                       ) -> list[int]:
    """axolotl's ``train_on_eos`` on one tokenized chat row (labels are not shifted).

    * ``turn`` (plugtune's and axolotl's default): the stop token ending each trained turn is
      trained (labels unchanged);
    * ``last``: only the stop token of the last trained turn is trained;
    * ``none``: no stop token is trained (the model is not taught to stop);
    * ``all``: every stop token in the row is trained, also those ending user / system turns.

    Args:
        stops: the ids that end a turn (:attr:`TemplateInfo.stop_token_ids`).
    """
    if policy == "turn":
        return labels
    stop = set(stops)
    out = list(labels)
    if policy == "all":
        return [t if t in stop else lab for t, lab in zip(ids, out)]
    trained_stops = [i for i, (t, lab) in enumerate(zip(ids, out)) if lab != -100 and t in stop]
    keep = trained_stops[-1:] if policy == "last" else []
    for i in trained_stops:
        if i not in keep:
            out[i] = -100
    return out


_TOOL_PROBE = {"name": "plugtune_probe_fn", "description": "PLUGTUNE_PROBE_TOOL",
               "parameters": {"type": "object", "properties": {}}}
_tool_support: dict[str, bool] = {}


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools: the ``tools=`` schemas, an assistant
    ``tool_calls`` turn and a ``tool`` result all appear in its output (Qwen2.5, Qwen3 and
    Llama 3.1/3.2 templates do; ChatML / alpaca / llama2 do not). Cached per template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _tool_support:
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "plugtune_probe_fn",
                                                      "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "PLUGTUNE_PROBE_RESULT"}]
        try:
            out = tokenizer.apply_chat_template(msgs, tools=[_TOOL_PROBE], tokenize=False)
            ok = all(s in out for s in ("PLUGTUNE_PROBE_TOOL", "plugtune_probe_fn",
                                        "PLUGTUNE_PROBE_RESULT"))
        except Exception:  # a template that raises on tools has no tool support
            ok = False
        _tool_support[template] = ok
    return _tool_support[template]


def chat_for_template(tokenizer, example: dict) -> tuple[list[dict], list[dict] | None]:
    """A canonical chat example -> ``(messages, tools)`` for ``apply_chat_template``: native
    tool rendering when :func:`supports_tools`, else :func:`~plugtune.data.formats.flatten_tools`
    (tools described in the system turn, calls as JSON answers, results as user turns)."""
    msgs, tools = template_messages(example)
    has_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)
    if has_tools and not supports_tools(tokenizer):
        return flatten_tools(msgs, tools), None
    return msgs, tools


#: the row columns an ``encode`` function (``plugtune_encode``) returns
ENCODED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int64")),
    "labels": datasets.List(datasets.Value("int64")),
    "length": datasets.Value("int64"),
    "status": datasets.Value("string"),
    "images": datasets.List(datasets.Value("string")),
})

Encoder = Callable[[dict, int, "TemplateInfo | None"], dict]
#: ``rows(tokenizer, messages, tools) -> [messages, ...]`` (hook ``plugtune_chat_rows``)
ChatRows = Callable[[Any, list[dict], "list[dict] | None"], list[list[dict]]]


def hook_encoder(pm, spec, processor, tokenizer) -> Encoder:
    """An ``encode(example, max_len, template)`` function that calls ``plugtune_encode``.

    Raises (when called):
        DataError: no plugin encodes examples for the family.
    """
    def encode(example: dict, max_len: int, template) -> dict:
        row = pm.hook.plugtune_encode(spec=spec, processor=processor, tokenizer=tokenizer,
                                      example=example, max_len=max_len, template=template)
        if row is None:
            raise DataError(f"no plugin encodes examples for family {spec.family.name!r} "
                            f"(task {spec.task!r}); is its plugin installed?")
        return row
    return encode


#: bump when tokenization or label masking changes what a cached tokenized row holds
TOKENIZE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 hex digest of what decides ``tokenizer``'s output: its serialized backend
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens), special tokens, chat template,
    class and BOS/EOS handling.

    ``datasets.map`` would otherwise fingerprint the tokenize function by pickling everything it
    closes over, the whole tokenizer included: ~9 s per call for Gemma 3's 262k vocabulary on
    this 2-core CPU, against ~1 s here. Cached on the tokenizer object, keyed on its length and
    chat template (so adding tokens or setting a template afterwards recomputes it).
    Tokenizers without a ``backend_tokenizer`` (slow, sentencepiece-only) fall back to
    ``datasets``' own hasher. A family's ``chat_rows`` function is hashed with the rest (small
    and picklable by contract).
    """
    import hashlib

    from datasets.fingerprint import Hasher

    key = (len(tokenizer), getattr(tokenizer, "chat_template", None))
    cached = getattr(tokenizer, "_plugtune_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        digest = Hasher.hash(tokenizer)
    else:
        h = hashlib.sha256(backend.to_str().encode())
        h.update(repr((type(tokenizer).__name__, key, tokenizer.special_tokens_map,
                       getattr(tokenizer, "add_bos_token", None),
                       getattr(tokenizer, "add_eos_token", None),
                       tokenizer.padding_side, tokenizer.truncation_side)).encode())
        digest = h.hexdigest()
    try:
        tokenizer._plugtune_fingerprint = (key, digest)
    except AttributeError:  # pragma: no cover - objects that refuse new attributes
        pass
    return digest


def tokenize_dataset(ds: datasets.Dataset, tokenizer, recipe: Recipe, task: str,
                     info: TemplateInfo | None, encode: Encoder | None = None,
                     chat_rows: ChatRows | None = None) -> datasets.Dataset:
    """Tokenize canonical examples with ``datasets.map``; returns rows with a ``status`` column.

    ``encode`` (processor-based families, see :func:`hook_encoder`) replaces the text
    tokenizers; its rows also carry ``images``. ``chat_rows`` (the family's
    ``plugtune_chat_rows`` answer) turns one chat example into the conversations tokenized as
    rows (default: the conversation itself, one row).
    """
    max_len, policy, toi = recipe.sequence_len, recipe.truncation, recipe.train_on_inputs
    eos_policy = train_on_eos_policy(recipe)

    def fn(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": []}
        if encode is not None:
            out["images"] = []
        else:
            out["cut_tokens"] = []
        keys = list(batch)
        for j in range(len(batch[keys[0]])):
            ex = {k: batch[k][j] for k in keys if batch[k][j] is not None}
            if encode is not None:
                rows = [encode(ex, max_len, info)]
            elif ex.get("images"):
                raise DataError(f"a sample has {len(ex['images'])} image(s) but the model's family "
                                f"(task {task!r}) is text-only; use a vision model or drop images")
            elif task == "seq2seq":
                rows = [tokenize_seq2seq(tokenizer, *_seq2seq_view(ex), max_len)]
            elif "messages" in ex:
                msgs, tools = chat_for_template(tokenizer, ex)
                if chat_rows is not None:  # the family decides the rows
                    rows = [tokenize_chat(tokenizer, c, info, max_len, toi, policy, tools)
                            for c in chat_rows(tokenizer, msgs, tools)]
                else:  # one row, or the template's own views where it rewrites history
                    rows = tokenize_chat_rows(tokenizer, msgs, info, max_len, toi, policy, tools)
                if eos_policy != "turn":
                    for r in rows:
                        r["labels"] = apply_train_on_eos(
                            r["input_ids"], r["labels"], info.stop_token_ids, eos_policy)
            elif "text" in ex:
                rows = tokenize_text(tokenizer, ex["text"], max_len, info)
            else:
                raise DataError(f"cannot tokenize example with keys {sorted(ex)} for task {task}")
            for r in rows:
                for k in out:
                    out[k].append(r[k])
        return out

    fingerprint = None
    if encode is None:  # text rows: a cheap fingerprint (see tokenizer_fingerprint)
        from datasets.fingerprint import Hasher

        from plugtune import __version__

        fingerprint = Hasher.hash([TOKENIZE_VERSION, __version__, ds._fingerprint,
                                   tokenizer_fingerprint(tokenizer), max_len, policy, toi,
                                   eos_policy, task, repr(info), chat_rows])
    return ds.map(fn, batched=True, batch_size=256, remove_columns=ds.column_names,
                  num_proc=_num_proc(recipe, len(ds)) if encode is None else recipe.dataset_num_proc,
                  features=ENCODED_FEATURES if encode is not None else None, desc="tokenize",
                  new_fingerprint=fingerprint)


def _pad_fraction(lengths: list[int], batch_size: int, grouped: bool, seed: int) -> float:
    """Expected share of pad tokens when rows are batched and padded to the longest in batch.

    ``grouped`` mimics transformers' ``LengthGroupedSampler`` (mega-batches of 50 batches
    sorted by length); otherwise batches are random.
    """
    if not lengths:
        return 0.0
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    if grouped:
        mega = batch_size * 50
        idx = [i for k in range(0, len(idx), mega)
               for i in sorted(idx[k:k + mega], key=lambda i: -lengths[i])]
    padded = 0
    for k in range(0, len(idx), batch_size):
        chunk = [lengths[i] for i in idx[k:k + batch_size]]
        padded += max(chunk) * len(chunk)
    return 1 - sum(lengths) / padded


#: rows per batch of finalize's pass over the labels
_STATS_BATCH = 8192


def _label_stats(tok: datasets.Dataset, specials: set[int], unk: int | None,
                 batch_size: int) -> dict[str, Any]:
    """Per-row counts over ``tok``'s ``labels``, a batch at a time (Arrow -> numpy; never the
    whole column as Python lists): ``status`` (list of str), ``cut_tokens`` (total),
    ``n_ids`` (input ids per row), ``trained`` (labels != -100), ``own`` (trained and not in
    ``specials``), ``first_trained`` (the first label is trained), ``unk`` (labels == ``unk``)."""
    import numpy as np
    import pyarrow.compute as pc

    cols = ["status", "input_ids", "labels"] + (["cut_tokens"] if "cut_tokens" in tok.column_names else [])
    status: list[str] = []
    parts: dict[str, list] = {k: [] for k in ("n_ids", "trained", "own", "first_trained", "unk")}
    cut = 0
    special_ids = np.array(sorted(specials), dtype=np.int64)
    for batch in tok.select_columns(cols).with_format("arrow").iter(batch_size=batch_size):
        status += batch.column("status").to_pylist()
        if "cut_tokens" in cols:
            cut += pc.sum(batch.column("cut_tokens")).as_py() or 0
        parts["n_ids"].append(pc.list_value_length(batch.column("input_ids")).to_numpy())
        lab = batch.column("labels")
        n = pc.list_value_length(lab).to_numpy().astype(np.int64)
        flat = np.asarray(pc.list_flatten(lab).to_numpy(), dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(n)])

        def per_row(mask, cum=cum):
            c = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            return c[cum[1:]] - c[cum[:-1]]

        trained = flat != IGNORE_INDEX
        parts["trained"].append(per_row(trained))
        parts["own"].append(per_row(trained & ~np.isin(flat, special_ids)))
        first = np.zeros(len(n), dtype=bool)
        first[n > 0] = trained[cum[:-1][n > 0]]
        parts["first_trained"].append(first)
        parts["unk"].append(per_row(flat == unk) if unk is not None else np.zeros(len(n), np.int64))
    out: dict[str, Any] = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    out["status"], out["cut_tokens"] = status, cut
    return out


def finalize(tok: datasets.Dataset, recipe: Recipe, packing: bool, tokenizer=None
             ) -> tuple[datasets.Dataset, dict]:
    """Drop rows the length policy dropped and rows that train nothing, pack if asked, and
    compute the stats.

    Stats (besides counts of samples and rows): ``truncated_tokens`` (tokens the length policy
    cut, summed over the ``truncated`` samples), ``untrained`` (samples with no trained token
    other than BOS/EOS/pad: an empty response, a text of no token of its own; dropped, they
    would only add padding), and with ``tokenizer``: ``unk_label_tokens`` /
    ``unk_label_samples`` (trained labels that are the unknown token: text the tokenizer cannot
    represent) with ``unk_example``, a decoded snippet around the first one.

    Streams: the stats come from one batched pass over the labels and packing builds its rows
    batch by batch (:func:`~plugtune.data.packing.pack_dataset`), so memory stays flat in the
    number of samples; a memory-mapped ``tok`` gives a memory-mapped result.
    """
    import numpy as np

    specials = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    specials.discard(None)
    unk = getattr(tokenizer, "unk_token_id", None)
    ls = _label_stats(tok, specials, unk, _STATS_BATCH)
    status = np.array(ls["status"], dtype=object)
    dropped, chunked = status == "dropped", status == "chunked"
    untrained = ~dropped & ~chunked & (ls["own"] == 0)
    stats = {
        "samples": int((~chunked).sum()),
        "kept": int((status == "kept").sum()),
        "truncated": int((status == "truncated").sum()),
        "truncated_tokens": int(ls["cut_tokens"]),
        "dropped": int(dropped.sum()),
        "untrained": int(untrained.sum()),
        "chunked_extra_rows": int(chunked.sum()),
    }
    if unk is not None:
        hits = (ls["unk"] > 0) & ~dropped
        stats["unk_label_tokens"] = int(ls["unk"][hits].sum())
        stats["unk_label_samples"] = int(hits.sum())
        if hits.any():
            lab = tok.select_columns(["labels"])[int(np.flatnonzero(hits)[0])]["labels"]
            trained = [x for x in lab if x != IGNORE_INDEX]
            at = trained.index(unk)
            stats["unk_example"] = tokenizer.decode(trained[max(0, at - 8): at + 8])
    keep = ~dropped & ~untrained
    kept = np.flatnonzero(keep).tolist()
    trained_tokens = ls["trained"][keep]
    long_rows = packing and not recipe.multipack_real_batches  # one row per micro-batch
    if packing and kept:
        capacity = recipe.sequence_len * (recipe.micro_batch_size if long_rows else 1)
        tok = pack_dataset(tok, capacity, indices=None if keep.all() else kept,
                           lengths=ls["n_ids"][keep].tolist())
        trained_tokens = trained_tokens - ls["first_trained"][keep]  # packing masks each first label
    else:
        if not keep.all():
            tok = tok.select(kept)
        tok = tok.remove_columns([c for c in ("status", "cut_tokens") if c in tok.column_names])
    lengths = tok.select_columns(["length"]).to_dict()["length"] if len(tok) else []
    stats.update(
        rows=len(tok),
        real_tokens=sum(lengths),
        trained_tokens=int(trained_tokens.sum()),
        packed=packing,
        pad_fraction=round(_pad_fraction(lengths, 1 if long_rows else recipe.micro_batch_size,
                                         recipe.group_by_length and not packing,
                                         recipe.seed), 4),
    )
    return tok, stats


#: share of samples dropped or truncated above which a run prints one warning line (the counts
#: are always in ``data_stats.json``); 5 %: below it, a few outliers of a real dataset.
DATA_WARN_SHARE = 0.05


def data_loss_warning(stats: dict, recipe: Recipe, share: float = DATA_WARN_SHARE) -> str | None:
    """The one warning line when more than ``share`` of the samples were dropped (longer than
    ``sequence_len`` even with the prompt cut) or truncated, with the numbers and the fix;
    ``None`` below it. ``stats``: :func:`finalize`'s (``samples``, ``dropped``, ``truncated``,
    ``truncated_tokens``)."""
    n = stats.get("samples") or 0
    dropped, cut = stats.get("dropped", 0), stats.get("truncated", 0)
    if not n or (dropped <= share * n and cut <= share * n):
        return None
    parts = []
    if dropped > share * n:
        parts.append(f"{dropped} of {n} samples ({100 * dropped / n:.0f} %) dropped as too long")
    if cut > share * n:
        tokens = (f" ({stats['truncated_tokens']:,} tokens cut)"
                  if "truncated_tokens" in stats else "")
        parts.append(f"{cut} of {n} ({100 * cut / n:.0f} %) truncated{tokens}")
    return (f"data: {'; '.join(parts)} at sequence_len={recipe.sequence_len} (truncation: "
            f"{recipe.truncation}); raise sequence_len or shorten the data to train on all of "
            "it (counts: data_stats.json)")


def check_trainable(stats: dict, recipe: Recipe) -> None:
    """Raise :class:`DataError` when most samples train nothing (see :func:`finalize`).

    Names the recipe's dataset files; a few such samples only give a warning.
    """
    n, bad = stats["samples"] - stats["dropped"], stats["untrained"]
    if not bad:
        return
    where = ", ".join(d.path for d in recipe.datasets)
    if bad * 2 > n:
        raise DataError(
            f"{where}: {bad} of {n} samples train nothing (no trained token besides BOS/EOS: "
            "empty responses, or text that tokenizes to nothing); check the dataset's type and "
            "columns")
    log.warning("%s: %d of %d samples train nothing and were left out", where, bad, n)


def _trained_texts(ex: dict) -> list[str]:
    """The texts of a canonical example that become trained labels."""
    if "messages" in ex:
        return [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
    if "target" in ex:
        return [ex["target"]]
    return [ex["text"]] if "text" in ex else []


def check_representable(tokenizer, raw: datasets.Dataset, stats: dict, limit: int = 256) -> dict:
    """Warn (once, with counts and an example) when the tokenizer loses part of the text.

    Two signs: trained labels that are the unknown token (counted by :func:`finalize` over all
    rows), and, over the first ``limit`` samples, trained texts (responses, targets, raw text)
    that do not decode back to themselves (e.g. T5's sentencepiece turns newlines into spaces
    and ``{`` / ``}`` into ``<unk>``). Leading/trailing whitespace is ignored.

    Returns:
        stats to add: ``lossy_samples`` (of ``lossy_checked``) and ``lossy_example``.
    """
    lossy, example, checked = 0, None, 0
    cols = [c for c in ("messages", "target", "text") if c in raw.column_names]
    if cols:
        for ex in raw.select(range(min(limit, len(raw)))).select_columns(cols):
            checked += 1
            for t in _trained_texts({k: v for k, v in ex.items() if v is not None}):
                ids = tokenizer(t, add_special_tokens=False)["input_ids"]
                back = tokenizer.decode(ids, skip_special_tokens=False)
                if back.strip() != t.strip():
                    lossy += 1
                    example = example or (t, back)
                    break
    out: dict[str, Any] = {"lossy_samples": lossy, "lossy_checked": checked}
    if stats.get("unk_label_tokens") or lossy:
        msg = []
        if stats.get("unk_label_tokens"):
            msg.append(f"{stats['unk_label_tokens']} trained label tokens in "
                       f"{stats['unk_label_samples']} samples are the unknown token "
                       f"{tokenizer.unk_token!r} (e.g. {stats['unk_example']!r})")
        if lossy:
            t, back = example
            i = next((k for k, (a, b) in enumerate(zip(t, back)) if a != b), min(len(t), len(back)))
            out["lossy_example"] = f"{t[max(0, i - 20): i + 20]!r} -> {back[max(0, i - 20): i + 20]!r}"
            msg.append(f"{lossy} of {checked} checked samples do not decode back to their text "
                       f"(e.g. {out['lossy_example']})")
        log.warning("the tokenizer cannot represent part of the text: %s; the model trains "
                    "on what it can represent (choose a tokenizer that covers these characters, "
                    "or clean the data)", "; ".join(msg))
    return out


def _eval_examples(ds: datasets.Dataset | None, limit: int | None) -> list[dict]:
    if ds is None:
        return []
    out = []
    for ex in ds.select(range(min(len(ds), limit or len(ds)))):
        ex = {k: v for k, v in ex.items() if v is not None}
        if "messages" in ex:
            msgs = template_messages(ex)[0]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            item = {"prompt": msgs[:last], "reference": msgs[last]["content"]}
            if "images" in ex:  # vision: the images whose placeholders lie in the prompt
                item["images"] = list(ex["images"])[:sum(
                    m["content"].count(IMAGE_PLACEHOLDER) for m in msgs[:last])]
            out.append(item)
        elif "source" in ex:
            out.append({"prompt": [{"role": "user", "content": ex["source"]}],
                        "source": ex["source"], "reference": ex["target"]})
        elif "text" in ex:
            out.append({"text": ex["text"]})
    return out


def prepare(recipe: Recipe, tokenizer, task: str = "causal",
            encode: Encoder | None = None, chat_rows: ChatRows | None = None) -> PreparedData:
    """Build train/eval rows for a run (see module docstring).

    Args:
        recipe: the validated recipe.
        tokenizer: a fast ``transformers`` tokenizer (modified in place: chat template, pad).
        task: ``"causal"``, ``"seq2seq"`` or ``"vision"`` (from the model's family).
        encode: for ``"vision"``: the ``plugtune_encode`` hook bound to the run's processor
            (:func:`hook_encoder`); rows keep their ``images`` and are never packed.
        chat_rows: the family's ``plugtune_chat_rows`` answer (``pm.hook.plugtune_chat_rows(
            spec=spec, tokenizer=tokenizer)``), or ``None``: each chat example is one row.

    Raises:
        DataError: bad input (names file, line, field) or no sample left after the length policy.
    """
    train_raw, load_stats = load_datasets(recipe.datasets, recipe.dataset_num_proc, recipe.dataset_seed)
    eval_raw = None
    if recipe.test_datasets:
        eval_raw, _ = load_datasets(recipe.test_datasets, recipe.dataset_num_proc, recipe.dataset_seed,
                                    key="test_datasets")
    elif recipe.val_set_size > 0:
        n = recipe.val_set_size if recipe.val_set_size >= 1 else max(1, int(recipe.val_set_size * len(train_raw)))
        split = train_raw.train_test_split(test_size=int(n), seed=recipe.dataset_seed)
        train_raw, eval_raw = split["train"], split["test"]
    kind = kind_of(train_raw[0]) if len(train_raw) else "chat"
    from plugtune.token_rows import add_tokens

    added: list[str] = add_tokens(tokenizer, recipe.added_tokens)
    if kind in ("preference", "kto"):  # tokenized by the method (dpo.py, methods/)
        return PreparedData(train=train_raw, eval=eval_raw, eval_examples=[], kind=kind,
                            template=None, stats={"samples": len(train_raw), **load_stats},
                            added_tokens=added, raw_train=train_raw, raw_eval=eval_raw)
    info = None
    if task != "seq2seq" and kind == "chat":
        added += ensure_chat_template(tokenizer, recipe.chat_template)
        info = probe_template(tokenizer)
    elif task != "seq2seq":
        info = TemplateInfo(stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
                            end_of_turn=None, bos_in_template=False,
                            add_bos=tokenizer.bos_token_id is not None, bos_id=tokenizer.bos_token_id,
                            eos_token=tokenizer.eos_token)
    if task == "vision" and encode is None:
        raise DataError("a vision family tokenizes through its processor: pass "
                        "encode=hook_encoder(pm, spec, processor, tokenizer) to prepare()")
    packable = task not in ("seq2seq", "vision")
    if recipe.sample_packing and not packable:
        log.warning("sample_packing is ignored for task %r (rows are not packed)", task)
    train_tok = tokenize_dataset(train_raw, tokenizer, recipe, task, info, encode, chat_rows)
    train, stats = finalize(train_tok, recipe, recipe.sample_packing and packable, tokenizer)
    stats["skipped_bad_rows"] = load_stats["skipped_bad_rows"]
    stats["per_dataset"] = load_stats["per_dataset"]
    if added:
        stats["added_tokens"] = list(added)
    check_trainable(stats, recipe)
    if (warning := data_loss_warning(stats, recipe)) is not None:
        log.warning(warning)
    stats.update(check_representable(tokenizer, train_raw, stats))
    if stats["rows"] == 0:
        raise DataError(
            f"no training sample left: {stats['dropped']} of {stats['samples']} samples are longer "
            f"than sequence_len={recipe.sequence_len} even with the prompt truncated; raise "
            "sequence_len or shorten the data")
    evald = None
    if eval_raw is not None and len(eval_raw):
        pack_eval = recipe.eval_sample_packing if recipe.eval_sample_packing is not None else recipe.sample_packing
        eval_tok = tokenize_dataset(eval_raw, tokenizer, recipe, task, info, encode, chat_rows)
        evald, estats = finalize(eval_tok, recipe, pack_eval and packable, tokenizer)
        stats["eval"] = estats
    return PreparedData(train=train, eval=evald,
                        eval_examples=_eval_examples(eval_raw, recipe.eval_max_samples),
                        kind=kind, template=info, stats=stats, added_tokens=added,
                        raw_train=train_raw, raw_eval=eval_raw)
