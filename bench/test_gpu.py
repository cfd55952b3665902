"""The CPU-testable parts of bench/gpu.py: model shapes and FLOPs, MFU, the run matrix and its
gating (no CUDA, no liger-kernel, no bitsandbytes), the wheel list and carry budget, the
synthetic data + word-id tokenizer, and the clear refusal on a machine without CUDA.

    python -m pytest -q bench/test_gpu.py
"""

from __future__ import annotations

import json

import pytest
import torch
from gpu import (
    SHAPES,
    carry_check,
    flops_per_token,
    llama_config,
    main,
    make_tokenizer,
    mfu,
    missing_wheels,
    param_count,
    peak_flops,
    plan,
    synthetic_samples,
)


@pytest.mark.parametrize("shape,approx", [("1b", 1.236e9), ("8b", 8.03e9)])
def test_shapes_build_and_count(shape, approx):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: shapes only
        model = AutoModelForCausalLM.from_config(llama_config(shape))
    n = sum(p.numel() for p in model.parameters())
    assert param_count(shape) == n
    assert n == pytest.approx(approx, rel=0.01)  # Llama 3.2 1B / Llama 3.1 8B


def test_flops_mfu_and_peaks():
    n = param_count("1b")
    assert flops_per_token("1b", 0) == 6 * n
    assert flops_per_token("1b", 512) == 6 * n + 12 * 16 * 2048 * 512
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("Some GPU") is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_plan_gates_on_cuda_and_optional_wheels():
    runs = plan(["1b", "8b"], ["lora", "qlora"], [2048, 4096],
                ["plugtune", "plugtune_liger", "trl_packing", "trl_liger"], cuda=False)
    assert len(runs) == 32 and all(r["skip"] == "no CUDA device" for r in runs)
    assert [r["shape"] for r in runs[:16]] == ["1b"] * 16  # small first: a budget cuts 8B

    def have(name):
        return name not in ("liger-kernel", "bitsandbytes")

    runs = plan(["1b"], ["lora", "qlora"], [2048], ["plugtune", "trl_liger"], cuda=True, have=have)
    by = {(r["adapter"], r["method"]): r["skip"] for r in runs}
    assert by[("lora", "plugtune")] is None
    assert by[("lora", "trl_liger")] == "liger-kernel not installed"
    assert by[("qlora", "plugtune")] == "bitsandbytes not installed"


def test_wheels_and_carry_budget():
    miss = missing_wheels(lambda n: n not in ("liger-kernel", "flash-attn"))
    assert [m["name"] for m in miss] == ["liger-kernel", "flash-attn"]
    assert all(m["optional"] for m in miss)
    assert carry_check({"a.whl": 10 * 2**20, "b.whl": 50 * 2**20}) == {
        "total_mib": 60.0, "ok": True, "largest": ["b.whl", "a.whl"]}
    assert carry_check({"bnb.whl": 70 * 2**20})["ok"] is False


def test_synthetic_data_maps_to_chosen_ids(tmp_path):
    from plugtune.data.templates import ensure_chat_template

    rows = synthetic_samples(50, vocab=1000, seq=2048)
    assert rows == synthetic_samples(50, vocab=1000, seq=2048)  # same data for every method
    lens = [len((r["prompt"] + " " + r["completion"]).split()) for r in rows]
    assert min(lens) >= 16 and max(lens) <= 1024
    tok = make_tokenizer(1000, tmp_path)
    assert tok("w17 w9", add_special_tokens=False)["input_ids"] == [17, 9]
    ensure_chat_template(tok, "alpaca")
    text = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]},
                                    {"role": "assistant", "content": rows[0]["completion"]}],
                                   tokenize=False)
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids  # the template's words are in the vocabulary
    assert set(SHAPES) == {"1b", "8b"}


def test_without_cuda_it_refuses_clearly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--shapes", "1b", "--seq", "2048"]) == 2
    out = capsys.readouterr()
    assert "no CUDA device here: nothing measured" in out.err
    assert json.loads(out.out)["cuda"] is False
