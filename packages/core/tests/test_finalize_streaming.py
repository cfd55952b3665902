"""Streaming ``finalize`` (batched label stats, packing by ``datasets.map``) gives exactly the
rows and stats of the in-memory algorithm it replaced, on real data with a real tokenizer, and a
memory-mapped source gives a memory-mapped result."""

from __future__ import annotations

import json
import os

import datasets
import pytest

import plugtune.data.packing as packing
import plugtune.data.pipeline as pipeline
from plugtune.config import validate_recipe
from plugtune.data.loading import load_datasets
from plugtune.data.packing import pack_dataset, pack_rows
from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import probe_template
from plugtune.testing import load_shared_tokenizer, shared_path


def _reference_finalize(tok, recipe, packing_on, tokenizer):
    """The in-memory algorithm ``finalize`` had before it streamed (whole columns as Python
    lists, :func:`pack_rows`, ``Dataset.from_dict``): the oracle."""
    status = tok["status"]
    labels = tok.select_columns(["labels"]).to_dict()["labels"] if len(tok) else []
    specials = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    specials.discard(None)
    untrained = [s not in ("dropped", "chunked")
                 and not any(x != -100 and x not in specials for x in lab)
                 for s, lab in zip(status, labels)]
    stats = {"samples": sum(1 for s in status if s != "chunked"), "kept": status.count("kept"),
             "truncated": status.count("truncated"),
             "truncated_tokens": sum(tok["cut_tokens"]) if "cut_tokens" in tok.column_names else 0,
             "dropped": status.count("dropped"), "untrained": sum(untrained),
             "chunked_extra_rows": status.count("chunked")}
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        hits = [(i, lab) for i, lab in enumerate(labels) if unk in lab and status[i] != "dropped"]
        stats["unk_label_tokens"] = sum(lab.count(unk) for _, lab in hits)
        stats["unk_label_samples"] = len(hits)
        if hits:
            trained = [x for x in hits[0][1] if x != -100]
            at = trained.index(unk)
            stats["unk_example"] = tokenizer.decode(trained[max(0, at - 8): at + 8])
    keep = [s != "dropped" and not u for s, u in zip(status, untrained)]
    if not all(keep):
        tok = tok.select([i for i, k in enumerate(keep) if k])
        labels = [lab for lab, k in zip(labels, keep) if k]
    tok = tok.remove_columns([c for c in ("status", "cut_tokens") if c in tok.column_names])
    long_rows = packing_on and not recipe.multipack_real_batches
    if packing_on and len(tok):
        capacity = recipe.sequence_len * (recipe.micro_batch_size if long_rows else 1)
        rows = pack_rows(tok.select_columns(["input_ids"]).to_dict()["input_ids"], labels, capacity)
        labels = rows["labels"]
        tok = datasets.Dataset.from_dict(rows)
    lengths = list(tok["length"]) if len(tok) else []
    stats.update(rows=len(tok), real_tokens=sum(lengths),
                 trained_tokens=sum(sum(1 for x in lab if x != -100) for lab in labels),
                 packed=packing_on,
                 pad_fraction=round(pipeline._pad_fraction(
                     lengths, 1 if long_rows else recipe.micro_batch_size,
                     recipe.group_by_length and not packing_on, recipe.seed), 4))
    return tok, stats


class _UnkAs:
    """The real tokenizer, but with a frequent word as its unknown token, so that the unk
    counts and the example snippet are exercised on real data."""

    def __init__(self, tok, word):
        self._tok = tok
        self.unk_token_id = tok.convert_tokens_to_ids(word)
        for a in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self, a, getattr(tok, a))

    def decode(self, ids):
        return self._tok.decode(ids)


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    """alpaca_en_demo.json (999 samples) with every 50th response only an EOS (untrained), the
    llama2 tokenizer, sequence_len 256 (long samples dropped); tokenized, cache-file backed."""
    rows = json.loads(shared_path("llama_factory", "alpaca_en_demo.json").read_text(encoding="utf-8"))
    for i in range(0, len(rows), 50):
        rows[i]["output"] = "</s>"  # tokenizes to the EOS alone: trains nothing
    path = tmp_path_factory.mktemp("alpaca") / "alpaca_untrained.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    tok = load_shared_tokenizer("llama2")
    ensure_chat_template(tok, "alpaca")

    def recipe(**kw):
        return validate_recipe({"base_model": "x", "sequence_len": 256, "micro_batch_size": 3,
                                "datasets": [{"path": str(path), "type": "alpaca"}], **kw})

    raw, _ = load_datasets(recipe().datasets, None, 42)
    ds = pipeline.tokenize_dataset(raw, tok, recipe(), "causal", probe_template(tok))
    return ds, tok, recipe


@pytest.mark.parametrize("mode", ["unpacked", "packed", "packed_long_rows", "packed_in_memory"])
def test_streaming_finalize_equals_the_in_memory_algorithm(alpaca, mode, monkeypatch):
    ds, tok, recipe = alpaca
    if mode == "packed_in_memory":
        ds = datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)
    rec = recipe(multipack_real_batches=mode != "packed_long_rows")
    tokenizer = _UnkAs(tok, "▁the")
    on = mode != "unpacked"
    monkeypatch.setattr(pipeline, "_STATS_BATCH", 97)  # many batches, none aligned to 1000-row chunks
    monkeypatch.setattr(packing, "_PACK_BATCH", 13)
    got, stats = pipeline.finalize(ds, rec, on, tokenizer)
    want, want_stats = _reference_finalize(ds, rec, on, tokenizer)

    assert stats["untrained"] == 20 and stats["dropped"] > 0 and stats["unk_label_samples"] > 100
    assert stats == want_stats
    assert got.column_names == want.column_names and got.features == want.features
    assert got.to_dict() == want.to_dict()
    if mode == "packed_long_rows":
        assert max(want["length"]) > rec.sequence_len
    # memory-mapped in, memory-mapped out (the old algorithm built packed rows in memory)
    assert bool(got.cache_files) == (mode != "packed_in_memory")


def test_pack_dataset_is_memory_mapped_beside_a_memory_mapped_source(alpaca):
    ds, _, _ = alpaca
    assert ds.cache_files, "the tokenized source lives in datasets' cache files"
    rows = list(range(0, len(ds), 3))
    lengths = [len(x) for x in ds.select(rows)["input_ids"]]
    keep = [i for i, n in zip(rows, lengths) if n]  # dropped samples are empty rows
    packed = pack_dataset(ds, 256, indices=keep)
    files = [f["filename"] for f in packed.cache_files]
    assert len(files) == 1 and os.path.dirname(files[0]) == os.path.dirname(ds.cache_files[0]["filename"])
    assert os.path.basename(files[0]).startswith("cache-packed-")
    sub = ds.select(keep)
    assert packed.to_dict() == pack_rows(sub["input_ids"], sub["labels"], 256)
    again = pack_dataset(ds, 256, indices=keep, lengths=[n for n in lengths if n])
    assert [f["filename"] for f in again.cache_files] == files, "same input, same cache file"
    other = pack_dataset(ds, 512, indices=keep)
    assert [f["filename"] for f in other.cache_files] != files, "the capacity names the file"

    in_memory = datasets.Dataset.from_dict(sub.to_dict(), features=sub.features)
    packed_mem = pack_dataset(in_memory, 256)
    assert not packed_mem.cache_files and packed_mem.to_dict() == packed.to_dict()
    with pytest.raises(ValueError, match="capacity 64"):
        pack_dataset(in_memory, 64)
