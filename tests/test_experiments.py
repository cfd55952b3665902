"""Smoke test of ``nox -s experiments`` (experiments/run.py --quick): a few steps of experiments
1 (SAMSum, LoRA on SmolLM2) and 2 (packing vs padding) on the real model and data, through the
plugtune CLI; the metrics must move the right way. Skips without ../shared."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_experiments_move_the_metrics(tmp_path):
    from plugtune.testing import shared_path

    shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    pytest.importorskip("gguf")
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--quick",
                          "--only", "samsum,packing", "--name", "smoke", "--out", str(tmp_path / "res"),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "res" / "smoke.json").read_text())
    assert (tmp_path / "res" / "smoke.md").is_file() and (tmp_path / "res" / "smoke.png").is_file()
    rows = {(r["experiment"], r["variant"]): r for r in out["rows"]}
    base, lora = rows["samsum", "base (prompted)"], rows["samsum", "LoRA r16 all-linear"]
    # 1: LoRA on SAMSum lowers the held-out summary loss below the prompted base model's
    assert math.isfinite(base["heldout_loss"]) and lora["heldout_loss"] < base["heldout_loss"] - 0.05
    assert 0 < lora["trainable_pct"] < 5 and lora["steps"] > 0 and lora["peak_rss_mib"] > 100
    # 2: the same samples and tokens in fewer rows with less padding; held-out loss measured for
    # both layouts and the base (a few steps on an instruction-tuned model need not lower it)
    packed, padded = rows["packing", "packing"], rows["packing", "padding"]
    assert packed["train_samples"] == padded["train_samples"]
    assert packed["rows"] < padded["rows"] and packed["tokens_seen"] == padded["tokens_seen"]
    assert packed["pad_fraction"] < padded["pad_fraction"]
    base_loss = rows["packing", "base (no training)"]["heldout_loss"]
    for r in (packed, padded):
        assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] < base_loss + 0.5, r
    assert out["packing_speedup"] > 0 and "load average" in out["uptime_before"]
