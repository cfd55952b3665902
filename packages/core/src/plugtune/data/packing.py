"""Contamination-free sample packing.

Whole samples are packed best-fit-decreasing into rows of at most ``sequence_len`` tokens; no
sample is split and none is dropped (the tail lands in the last rows). Each row carries
``position_ids`` that restart at 0 for every sample. With ``attention_mask=None`` and
``use_cache=False``, transformers derives a block-diagonal causal mask from restarting
position ids (``masking_utils.find_packed_sequence_indices``; flash-attn 2 turns them into
varlen ``cu_seqlens``), so packed samples never attend to each other. The first label of every
sample is ``-100`` so no sample is trained to predict the next sample's first token.

Keeping rows as a ``(batch, sequence_len)`` batch rather than one flattened row matters on CPU:
sdpa has no varlen kernel, so one row of ``B*S`` tokens costs ``O((B*S)^2)`` attention
(../shared/FINDINGS.md: flattened 1580 tok/s vs rows 2600 tok/s).

:func:`pack_rows` packs Python lists in memory; :func:`pack_dataset` builds the same rows from a
``datasets.Dataset`` batch by batch (a ``datasets.map`` over the bins), so packing 100k samples
holds one batch of rows in memory, not the whole corpus.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

from plugtune.data.tokenize import IGNORE_INDEX

#: bump when :func:`pack_dataset`'s output for the same input changes (names its cache files)
_PACK_VERSION = 1
#: bins per batch of :func:`pack_dataset`'s map
_PACK_BATCH = 1000


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack item indices into bins of ``capacity`` (best-fit decreasing, O(n log n)).

    Args:
        lengths: item sizes in tokens; each must be ``<= capacity``.
        capacity: bin size in tokens (``sequence_len``).

    Returns:
        Bins as lists of item indices; every index appears exactly once.

    Raises:
        ValueError: an item longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
        else:
            rem, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        rem -= n
        if rem > 0:
            bisect.insort(free, (rem, b))
    return bins


def pack_rows(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              capacity: int) -> dict[str, list[list[int]]]:
    """Pack tokenized samples into rows.

    Returns:
        ``{"input_ids", "labels", "position_ids", "length"}``, one entry per row; rows hold
        whole samples, ``position_ids`` restart at 0 per sample, and the first label of each
        sample is ``-100``.
    """
    bins = best_fit_decreasing([len(x) for x in input_ids], capacity)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    for b in bins:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        for i in b:
            ids.extend(input_ids[i])
            lab = list(labels[i])
            lab[0] = IGNORE_INDEX
            labs.extend(lab)
            pos.extend(range(len(input_ids[i])))
        rows["input_ids"].append(ids)
        rows["labels"].append(labs)
        rows["position_ids"].append(pos)
        rows["length"].append(len(ids))
    return rows


def _packed_features():
    import datasets

    # input_ids int32 as datasets' own writer stores a column of that name (OptimizedTypedSequence)
    ints = datasets.List(datasets.Value("int64"))
    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")), "labels": ints,
                              "position_ids": ints, "length": datasets.Value("int64")})


def _pack_batch(bins, src):
    """One batch of bins (an Arrow table with a ``rows`` column: lists of row indices of
    ``src``) -> the packed rows as an Arrow table, exactly as :func:`pack_rows` builds them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    col = bins.column("rows")
    per_bin = pc.list_value_length(col).to_numpy()
    t = src[pc.list_flatten(col).to_numpy()]  # one take: the bins' samples in packed order

    def flat(name):
        c = t.column(name)
        n = pc.list_value_length(c).to_numpy().astype(np.int64)
        v = np.array(pc.list_flatten(c).to_numpy(), dtype=np.int64)  # a writable copy
        return v, n, np.concatenate([[0], np.cumsum(n)])

    ids, n_ids, ids_cum = flat("input_ids")
    labs, n_labs, labs_cum = flat("labels")
    labs[labs_cum[:-1][n_labs > 0]] = IGNORE_INDEX  # each sample's first label
    pos = np.arange(len(ids), dtype=np.int64) - np.repeat(ids_cum[:-1], n_ids)
    bounds = np.concatenate([[0], np.cumsum(per_bin)])  # sample index at each bin start
    ids_off, labs_off = ids_cum[bounds], labs_cum[bounds]

    def lists(off, values, typ=pa.int64()):
        return pa.ListArray.from_arrays(pa.array(off, pa.int32()), pa.array(values, typ))

    return pa.table({"input_ids": lists(ids_off, ids, pa.int32()), "labels": lists(labs_off, labs),
                     "position_ids": lists(ids_off, pos),
                     "length": pa.array(np.diff(ids_off), pa.int64())})


def pack_dataset(ds, capacity: int, indices: Sequence[int] | None = None,
                 lengths: Sequence[int] | None = None, batch_size: int | None = None):
    """Pack the rows of a tokenized ``datasets.Dataset`` like :func:`pack_rows`, streaming.

    Best-fit decreasing runs on the lengths alone; the rows are then built by a batched
    ``datasets.map`` over the bins, each batch fetching its samples with one take from ``ds``,
    so memory holds the lengths and one batch, not the corpus. When ``ds`` lives in cache files
    (memory-mapped Arrow), the packed rows are written to a cache file beside them, named from
    ``ds``'s fingerprint, ``indices`` and ``capacity`` (reused when it exists, as
    ``datasets.map`` does); an in-memory ``ds`` gives an in-memory result.

    Args:
        ds: rows with ``input_ids`` and ``labels`` (lists of token ids).
        capacity: row size in tokens (``sequence_len``, or ``sequence_len * micro_batch_size``
            for one long row per micro-batch).
        indices: the rows of ``ds`` to pack, in this order (default: all); the result equals
            ``Dataset.from_dict(pack_rows([ds[i]["input_ids"] for i in indices],
            [ds[i]["labels"] for i in indices], capacity))``.
        lengths: ``len(ds[i]["input_ids"])`` for each packed row when the caller has them
            (else read from ``ds``, a batch at a time).
        batch_size: bins per batch (default ``_PACK_BATCH``).

    Returns:
        A dataset with ``input_ids`` (lists of int32, as ``datasets`` stores that column),
        ``labels``, ``position_ids`` (lists of int64) and ``length`` (int64): one row per bin,
        in :func:`pack_rows`' order.

    Raises:
        ValueError: a sample longer than ``capacity`` (``sample i`` counts within ``indices``).
    """
    import datasets
    import pyarrow.compute as pc
    from datasets.fingerprint import Hasher

    if lengths is None:
        lengths = []
        src = ds.select_columns(["input_ids"]).with_format("arrow")
        rows = range(len(ds)) if indices is None else indices
        for k in range(0, len(rows), 8192):
            part = src[list(rows[k:k + 8192])]["input_ids"]
            lengths.extend(pc.list_value_length(part).to_pylist())
    bins = best_fit_decreasing(lengths, capacity)
    if indices is not None:
        bins = [[indices[i] for i in b] for b in bins]
    features = _packed_features()
    fingerprint = Hasher.hash([_PACK_VERSION, str(features), ds._fingerprint, capacity,
                               None if indices is None else list(indices)])
    kw = {}
    if ds.cache_files:  # beside the source, content-addressed like datasets' own cache files
        kw["cache_file_name"] = os.path.join(os.path.dirname(ds.cache_files[0]["filename"]),
                                             f"cache-packed-{fingerprint}.arrow")
    src = ds.select_columns(["input_ids", "labels"]).with_format("arrow")
    plan = datasets.Dataset.from_dict(
        {"rows": bins}, features=datasets.Features({"rows": datasets.List(datasets.Value("int64"))}))
    packed = plan.with_format("arrow").map(
        _pack_batch, batched=True, batch_size=batch_size or _PACK_BATCH, fn_kwargs={"src": src},
        remove_columns=["rows"], features=features, new_fingerprint=fingerprint,
        desc="pack", **kw)
    return packed.with_format(None)
