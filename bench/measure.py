"""Pure bookkeeping of the benchmark: token counts, pad fraction, steady-state throughput, ratios.

Nothing here imports torch or touches the clock, so it is unit-tested in ``bench/test_bench.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: the comparisons the issue asks for: plugtune (a) against TRL default (b), TRL packing (c)
#: and the bare torch loop (d); keys as written in the results JSON
RATIO_KEYS = {"a/b": ("plugtune", "trl_default"), "a/c": ("plugtune", "trl_packing"),
              "a/d": ("plugtune", "bare_loop")}

#: targets of issue 8 (benchmark only, never asserted in timed tests)
TARGETS = {"a/b": 2.0, "a/c": 2.0, "a/d": 0.9, "pad_fraction_max": 0.02}


def pad_fraction(real_tokens: int, total_tokens: int) -> float:
    """Share of the tokens fed to the model that are padding: ``1 - real / total``.

    ``total_tokens`` is the number of positions in the input tensors (``input_ids.numel()``
    summed over micro-batches); ``real_tokens`` the tokens of actual samples in them.

    Raises:
        ValueError: negative counts or ``real_tokens > total_tokens``.
    """
    if real_tokens < 0 or total_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got real={real_tokens} total={total_tokens}")
    if real_tokens > total_tokens:
        raise ValueError(f"real tokens ({real_tokens}) exceed the tensor positions ({total_tokens})")
    return 0.0 if total_tokens == 0 else 1.0 - real_tokens / total_tokens


def steady_throughput(step_end_s: Sequence[float], cum_real_tokens: Sequence[int],
                      warmup: int) -> dict:
    """Steady-state real tokens/s from per-step end times, skipping ``warmup`` steps.

    Args:
        step_end_s: wall-clock time (s, any origin) at the end of each optimizer step 1..N.
        cum_real_tokens: real (non-pad) tokens consumed up to the end of each step 1..N.
        warmup: steps excluded from the measurement (first-step allocations, lazy init).

    Returns:
        ``{"steps", "seconds", "real_tokens", "tokens_per_s", "tokens_per_s_median",
        "s_per_step", "tokens_per_step"}`` over steps ``warmup+1 .. N``: the interval starts at
        the end of step ``warmup``, so everything between two steps (data loading, collation,
        logging) is included. ``tokens_per_s_median`` is the median of the per-step rates, less
        sensitive to bursts of other load on a shared machine.

    Raises:
        ValueError: mismatched lengths or fewer than ``warmup + 1`` steps.
    """
    if len(step_end_s) != len(cum_real_tokens):
        raise ValueError(f"{len(step_end_s)} step times but {len(cum_real_tokens)} token counts")
    if warmup < 1 or len(step_end_s) < warmup + 1:
        raise ValueError(f"need warmup >= 1 and more than {warmup} steps, got {len(step_end_s)}")
    steps = len(step_end_s) - warmup
    secs = step_end_s[-1] - step_end_s[warmup - 1]
    toks = cum_real_tokens[-1] - cum_real_tokens[warmup - 1]
    rates = sorted((cum_real_tokens[i] - cum_real_tokens[i - 1]) / (step_end_s[i] - step_end_s[i - 1])
                   for i in range(warmup, len(step_end_s)) if step_end_s[i] > step_end_s[i - 1])
    median = (rates[len(rates) // 2] if len(rates) % 2 else
              (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2) if rates else math.nan
    return {"steps": steps, "seconds": secs, "real_tokens": toks,
            "tokens_per_s": toks / secs if secs > 0 else math.nan,
            "tokens_per_s_median": median,
            "s_per_step": secs / steps, "tokens_per_step": toks / steps}


def padded_batching(packed_tokens_per_step: float, mean_sample_len: float,
                    max_micro_batch: int = 16) -> tuple[int, int]:
    """``(micro_batch, grad_accum)`` for a padded (one sample per row) run that consumes about
    as many real tokens per optimizer step as a packed run.

    The samples per step ``round(packed_tokens_per_step / mean_sample_len)`` are split into the
    fewest micro-batches of at most ``max_micro_batch`` samples.

    Raises:
        ValueError: non-positive inputs.
    """
    if packed_tokens_per_step <= 0 or mean_sample_len <= 0 or max_micro_batch < 1:
        raise ValueError("tokens per step, mean sample length and micro batch must be > 0")
    samples = max(1, round(packed_tokens_per_step / mean_sample_len))
    accum = -(-samples // max_micro_batch)
    return max(1, round(samples / accum)), accum


def ratios(tokens_per_s: dict[str, float]) -> dict[str, float | None]:
    """``{"a/b", "a/c", "a/d"}``: plugtune's real tokens/s over each other method's.

    ``tokens_per_s`` maps a method name (``plugtune``, ``trl_default``, ``trl_packing``,
    ``bare_loop``) to its real tokens/s; a missing or non-positive entry gives ``None``.
    """
    out: dict[str, float | None] = {}
    for key, (num, den) in RATIO_KEYS.items():
        a, b = tokens_per_s.get(num), tokens_per_s.get(den)
        ok = a is not None and b is not None and b > 0 and not math.isnan(a) and not math.isnan(b)
        out[key] = round(a / b, 3) if ok else None
    return out


def verdicts(ratio: dict[str, float | None], plugtune_pad: float | None) -> dict[str, bool | None]:
    """Whether each target of :data:`TARGETS` is met (``None`` when not measured)."""
    out: dict[str, bool | None] = {k: (None if ratio.get(k) is None else ratio[k] >= TARGETS[k])
                                   for k in RATIO_KEYS}
    out["pad"] = None if plugtune_pad is None else plugtune_pad <= TARGETS["pad_fraction_max"]
    return out


def linearity(points: Sequence[tuple[int, float]]) -> float | None:
    """How linear data preparation scales: throughput (samples/s) at the largest size over the
    throughput at the smallest. 1.0 = linear; below 1 = super-linear cost; ``None`` if < 2 points.

    Args:
        points: ``(samples, seconds)`` per size.
    """
    pts = sorted(p for p in points if p[1] > 0)
    if len(pts) < 2:
        return None
    (n0, s0), (n1, s1) = pts[0], pts[-1]
    return round((n1 / s1) / (n0 / s0), 3)


def linear_fit(points: Sequence[tuple[int, float]]) -> dict | None:
    """Least-squares ``seconds = fixed_s + samples * per_sample_s`` over ``(samples, seconds)``.

    Returns ``{"fixed_s", "per_sample_ms", "r2"}`` (``r2`` = 1 for perfectly linear cost), or
    ``None`` with fewer than 2 distinct sizes.
    """
    pts = list(points)
    n = len(pts)
    if n < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    fixed = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - fixed - slope * x) ** 2 for x, y in pts)
    return {"fixed_s": round(fixed, 3), "per_sample_ms": round(1000 * slope, 3),
            "r2": round(1 - ss_res / ss_tot, 4) if ss_tot > 0 else 1.0}


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, header, format)`` triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bin_packing_lower_bound(lengths: Sequence[int], capacity: int) -> int:
    """The fewest rows of ``capacity`` tokens that can hold whole samples of ``lengths``:
    Martello & Toth's L2 bound (Martello, Toth 1990, "Lower bounds and reduction procedures for
    the bin packing problem", Discrete Applied Mathematics 28): for each threshold ``k`` in
    ``[0, capacity/2]``, samples longer than ``capacity - k`` each need a row of their own,
    samples longer than half a row each need one too, and samples of ``k .. capacity/2`` tokens
    can only use what the half-row ones leave free. Never below the volume bound
    ``ceil(sum / capacity)``.

    Raises:
        ValueError: a sample longer than ``capacity``.
    """
    if any(x > capacity for x in lengths):
        raise ValueError(f"a sample is longer than capacity {capacity}")
    best = -(-sum(lengths) // capacity) if lengths else 0
    for k in sorted({0, *[x for x in lengths if x <= capacity // 2]}):
        n1 = [x for x in lengths if x > capacity - k]
        n2 = [x for x in lengths if capacity / 2 < x <= capacity - k]
        n3 = [x for x in lengths if k <= x <= capacity / 2]
        spare = len(n2) * capacity - sum(n2)
        best = max(best, len(n1) + len(n2) + max(0, -(-(sum(n3) - spare) // capacity)))
    return best


def pad_floor(lengths: Sequence[int], capacity: int) -> dict:
    """``{"rows_lower_bound", "pad_floor"}``: the least padding any packing of whole samples
    into rows of ``capacity`` can reach (``1 - sum / (rows * capacity)``)."""
    rows = bin_packing_lower_bound(lengths, capacity)
    return {"rows_lower_bound": rows,
            "pad_floor": round(pad_fraction(sum(lengths), rows * capacity), 4) if rows else 0.0}


def flop_ceiling(linear_macs: float, head_macs: float, attn_width: int, layers: int,
                 sample_lengths: Sequence[int], trained_fraction: float, trl_row_len: float,
                 adapter: bool) -> dict:
    """The a/c that doing less arithmetic per real token explains: (c)'s multiply-accumulates
    per real token over (a)'s. It bounds what (a)'s savings in attention and the LM head can
    buy when both spend their time in these multiply-accumulates (SmolLM2 LoRA: 1.20, measured
    1.30); a measured a/c above it means (c) spends time outside these counts (Llama 19.5M: 1.38,
    measured 2.96; not profiled here). The JSON key is ``a_c_flop_ceiling``.

    Both train the same weights on the same tokens, so the linear layers are common work; (a)
    saves only in attention (causal ``sdpa`` per packed sample, flash-style kernels skip the
    masked upper triangle: ``sum(L_i^2) / (2 sum(L_i))`` keys per query) against (c)'s explicit
    block mask over its whole row (every query scores all ``trl_row_len`` keys), and in the LM
    head (only trained positions, against every position). Multiply-accumulates per real token,
    forward: ``linear_macs + 2 * attn_width * layers * keys + head_macs * share``; backward
    costs 2x the forward for trained weights (input and weight gradients) and 1x for frozen ones
    (input gradients only: every base weight under LoRA); attention's backward is 2x its
    forward (Kaplan et al. 2020, arXiv:2001.08361, sec. 2.1: forward ~2N FLOPs per token,
    backward ~2x that). Elementwise work (norms, RoPE, activations, the optimizer) is left
    out, so for very narrow models the real ratio sits below this.

    Args:
        linear_macs: MACs per token of the decoder's linear layers (sum of in x out).
        head_macs: MACs per token of the LM head (hidden x vocab).
        attn_width: query heads x head dim.
        layers: decoder layers.
        sample_lengths: tokens of each packed sample (a's rows).
        trained_fraction: trained (label) tokens / real tokens.
        trl_row_len: mean tokens per row of (c) (its block mask spans the row).
        adapter: LoRA (frozen base weights) rather than full fine-tuning.

    Returns:
        ``{"a_macs_per_token", "c_macs_per_token", "a_c_ceiling"}`` (ratio c / a).

    Raises:
        ValueError: no samples.
    """
    if not sample_lengths:
        raise ValueError("no sample lengths")
    keys_a = sum(n * n for n in sample_lengths) / (2 * sum(sample_lengths))
    keys_c = float(trl_row_len)
    w = 2.0 if adapter else 3.0  # forward + backward of (frozen | trained) weights

    def cost(keys, head_share):
        return w * linear_macs + 3.0 * 2 * attn_width * layers * keys + w * head_macs * head_share

    a, c = cost(keys_a, trained_fraction), cost(keys_c, 1.0)
    return {"a_macs_per_token": round(a), "c_macs_per_token": round(c), "a_c_ceiling": round(c / a, 3)}
