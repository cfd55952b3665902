"""The benchmark's bookkeeping (no timing, no models): pad fraction, throughput window, batch
matching, ratios and targets.

    /work/venv/bin/python -m pytest -q bench/test_bench.py
"""

from __future__ import annotations

import math

import pytest
from measure import (
    TARGETS,
    linear_fit,
    linearity,
    pad_fraction,
    padded_batching,
    ratios,
    steady_throughput,
    table,
    verdicts,
)


def test_pad_fraction_counts_positions_not_samples():
    # two rows padded to 10: 7 + 10 real tokens of 20 positions
    assert pad_fraction(17, 20) == pytest.approx(0.15)
    assert pad_fraction(0, 0) == 0.0
    assert pad_fraction(5, 5) == 0.0
    with pytest.raises(ValueError, match="exceed"):
        pad_fraction(21, 20)
    with pytest.raises(ValueError):
        pad_fraction(-1, 20)


def test_steady_throughput_skips_warmup_and_includes_gaps_between_steps():
    ends = [10.0, 12.0, 14.0, 16.0, 18.0]  # first step slow (warm-up, 10 s), then 2 s per step
    cum = [100, 200, 300, 400, 500]
    r = steady_throughput(ends, cum, warmup=1)
    assert r["steps"] == 4 and r["seconds"] == pytest.approx(8.0)
    assert r["real_tokens"] == 400 and r["s_per_step"] == pytest.approx(2.0)
    assert r["tokens_per_s"] == pytest.approx(50.0)
    assert r["tokens_per_s_median"] == pytest.approx(50.0)
    burst = steady_throughput([1.0, 2.0, 3.0, 13.0, 14.0], [10, 20, 30, 40, 50], warmup=1)
    assert burst["tokens_per_s"] == pytest.approx(40 / 13)  # one step slowed by other load
    assert burst["tokens_per_s_median"] == pytest.approx(10.0)
    assert r["tokens_per_step"] == pytest.approx(100)
    r2 = steady_throughput(ends, cum, warmup=2)
    assert r2["tokens_per_s"] == pytest.approx(300 / 6)
    with pytest.raises(ValueError):
        steady_throughput(ends, cum[:-1], warmup=1)
    with pytest.raises(ValueError):
        steady_throughput(ends, cum, warmup=5)


@pytest.mark.parametrize("tokens,mean,expect", [
    (4064, 196.6, (7, 3)),   # 21 samples per step -> 3 micro-batches of 7
    (2040, 186.4, (11, 1)),  # 11 samples fit one micro-batch of <= 16
    (4064, 508, (8, 1)),
    (100, 1000, (1, 1)),     # never zero samples
])
def test_padded_batching_matches_real_tokens_per_step(tokens, mean, expect):
    mb, ga = padded_batching(tokens, mean, max_micro_batch=8 if tokens == 4064 else 16)
    assert (mb, ga) == expect
    assert mb <= 16
    if tokens > mean:
        assert abs(mb * ga * mean - tokens) <= mean * ga  # within one sample per micro-batch


def test_ratios_and_targets():
    r = ratios({"plugtune": 2600.0, "trl_default": 1300.0, "trl_packing": 1000.0, "bare_loop": 2800.0})
    assert r == {"a/b": 2.0, "a/c": 2.6, "a/d": pytest.approx(0.929, abs=1e-3)}
    v = verdicts(r, plugtune_pad=0.01)
    assert v == {"a/b": True, "a/c": True, "a/d": True, "pad": True}
    v = verdicts({"a/b": 1.5, "a/c": None, "a/d": 0.8}, plugtune_pad=0.05)
    assert v == {"a/b": False, "a/c": None, "a/d": False, "pad": False}
    assert ratios({"plugtune": 10.0, "trl_default": 0.0})["a/b"] is None
    assert ratios({"plugtune": math.nan, "bare_loop": 5.0})["a/d"] is None
    assert TARGETS["a/b"] == 2.0


def test_linearity_and_table():
    assert linearity([(151, 1.0), (604, 4.0), (2416, 16.0)]) == 1.0
    assert linearity([(151, 1.0), (2416, 32.0)]) == 0.5
    assert linearity([(151, 1.0)]) is None
    fit = linear_fit([(100, 1.5), (400, 3.0), (1600, 9.0)])  # 1 s fixed + 5 ms per sample
    assert fit == {"fixed_s": 1.0, "per_sample_ms": 5.0, "r2": 1.0}
    assert linear_fit([(100, 1.0), (400, 2.0), (1600, 30.0)])["r2"] < 0.99  # super-linear
    assert linear_fit([(100, 1.0)]) is None
    md = table([{"a": 1.234, "b": None}], [("a", "A", ".1f"), ("b", "B", "")])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1.2 | - |"]


def test_token_counter_attributes_batches_to_steps_in_collation_order():
    from workloads import CountingCollator, TokenCounter

    c = TokenCounter()

    class Pad:  # stands in for a collator: pads to the longest feature
        def __call__(self, feats):
            import types
            n = max(len(f["input_ids"]) for f in feats) * len(feats)
            return {"input_ids": types.SimpleNamespace(numel=lambda: n)}

    collate = CountingCollator(Pad(), c)
    for feats in ([[1, 2, 3], [4]], [[5, 6]], [[7], [8], [9]]):  # 3 micro-batches, one fetched ahead
        collate([{"input_ids": f} for f in feats])
    assert c.upto(1) == (4, 6)  # step 1 (accum 1) consumed only the first batch
    assert c.upto(2) == (6, 8)
    assert c.upto(3) == (9, 11)
    with pytest.raises(RuntimeError):
        c.upto(4)


def test_bin_packing_lower_bound_beats_the_volume_bound():
    from measure import bin_packing_lower_bound, pad_floor

    # three 60s in rows of 100: volume says 2 rows, but no two fit together -> 3
    assert bin_packing_lower_bound([60, 60, 60], 100) == 3
    # 2 x 70 + 6 x 30: the 70s take 2 rows with 30 free each, the other four 30s 2 more
    assert bin_packing_lower_bound([70, 70] + [30] * 6, 100) == 4
    assert bin_packing_lower_bound([50, 50, 50, 50], 100) == 2
    assert bin_packing_lower_bound([], 100) == 0
    assert pad_floor([60, 60, 60], 100) == {"rows_lower_bound": 3, "pad_floor": 0.4}
    with pytest.raises(ValueError):
        bin_packing_lower_bound([101], 100)


def test_packing_floor_reads_sample_lengths_from_packed_rows():
    import datasets
    from workloads import packing_floor

    rows = datasets.Dataset.from_dict({"position_ids": [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3]]})
    # samples 3, 3, 4 in rows of 6: the volume bound says 2 rows, and 2 were used
    assert packing_floor(rows, 6) == {"packed_rows": 2, "sample_lengths_sum": 10,
                                      "sample_lengths": [3, 3, 4], "rows_lower_bound": 2, "pad_floor": round(1 - 10 / 12, 4)}
    assert packing_floor(datasets.Dataset.from_dict({"input_ids": [[1]]}), 6) == {}


def test_a_worker_past_its_timeout_is_stopped_with_its_children(tmp_path):
    import os

    from run import run_worker

    with pytest.raises(RuntimeError, match="ran past --timeout"):
        run_worker({"method": "prep_scaling", "model_name": "t"}, tmp_path, dict(os.environ), 0.2)


def test_flop_ceiling_counts_attention_and_head_savings():
    from measure import flop_ceiling

    # no attention, head on every token in both: nothing to gain
    same = flop_ceiling(1000, 100, 0, 1, [10, 10], 1.0, 20, adapter=False)
    assert same["a_c_ceiling"] == 1.0
    # (a): samples of 4 -> 4*4*2/(2*8) = 2 keys per query; (c): rows of 8 keys
    r = flop_ceiling(0, 0, 1, 1, [4, 4], 1.0, 8, adapter=True)
    assert r["a_macs_per_token"] == 3 * 2 * 2 and r["c_macs_per_token"] == 3 * 2 * 8
    assert r["a_c_ceiling"] == 4.0
    # the head only on trained tokens: half the head's work
    h = flop_ceiling(0, 10, 0, 1, [5], 0.5, 5, adapter=True)
    assert h["a_c_ceiling"] == 2.0
    with pytest.raises(ValueError):
        flop_ceiling(1, 1, 1, 1, [], 1.0, 1, adapter=True)
