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
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from plugtune.data.tokenize import IGNORE_INDEX


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
