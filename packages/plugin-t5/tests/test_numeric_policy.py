"""The fp16 guard: T5 overflows in fp16; plugtune-t5 warns and trains in bf16/fp32 instead."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from plugtune.testing import make_spec
from plugtune_t5 import _policy
from plugtune_t5._policy import T5PrecisionWarning, safe_dtype
from plugtune_t5.tiny import tiny_t5


@pytest.fixture(scope="module")
def hot_dir(tmp_path_factory, t5_tokenizer):
    """A tiny T5 whose gated FFN activations exceed fp16's 65504, like real FLAN-T5 layers."""
    model = tiny_t5()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wi_0.weight", "wi_1.weight")):
                p.mul_(300)
    path = tmp_path_factory.mktemp("hot-t5")
    model.save_pretrained(path)
    t5_tokenizer.save_pretrained(path)
    return path


def _batch(tok):
    enc = tok(["Amanda: I baked cookies. Do you want some?\nJerry: Sure!",
               "Tom: running late\nAnna: ok"], return_tensors="pt", padding=True)
    labels = tok(text_target=["Amanda baked cookies for Jerry.", "Tom is late."],
                 return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def test_the_hazard_is_real(hot_dir, t5_tokenizer):
    """Without the guard, the same weights in fp16 give a NaN loss (so the next test can fail)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(hot_dir, dtype=torch.float16)
    with torch.no_grad():
        assert not math.isfinite(float(model(**_batch(t5_tokenizer)).loss))


def test_fp16_request_warns_and_loads_a_safe_dtype(hot_dir, t5_tokenizer):
    spec, pm = make_spec("t5", path=str(hot_dir), dtype="fp16", adapter="none")
    spec.torch_dtype = torch.float16  # what core's resolve_dtype("fp16") gives
    with pytest.warns(T5PrecisionWarning, match="overflow in fp16"):
        loaded = pm.hook.plugtune_load(spec=spec)
    expected = torch.bfloat16 if _policy.cuda_supports_bf16() else torch.float32
    assert spec.torch_dtype == expected  # the Trainer's fp16/bf16 flags follow this
    assert {p.dtype for p in loaded.model.parameters()} <= {expected, torch.float32}
    assert torch.float16 not in {p.dtype for p in loaded.model.parameters()}
    with torch.no_grad():
        loss = pm.hook.plugtune_train_step(spec=spec, model=loaded.model,
                                           batch=_batch(t5_tokenizer), num_items_in_batch=None)
    assert math.isfinite(float(loss))


def test_fp16_becomes_bf16_where_cuda_has_it(monkeypatch):
    spec, _ = make_spec("t5", dtype="fp16")
    spec.torch_dtype = torch.float16
    monkeypatch.setattr(_policy, "cuda_supports_bf16", lambda: True)
    with pytest.warns(T5PrecisionWarning, match="bf16"):
        assert safe_dtype(spec) == torch.bfloat16
    monkeypatch.setattr(_policy, "cuda_supports_bf16", lambda: False)
    with pytest.warns(T5PrecisionWarning, match="fp32"):
        assert safe_dtype(spec) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safe_requests_are_kept_silently(dtype, recwarn):
    spec, _ = make_spec("t5")
    spec.torch_dtype = dtype
    assert safe_dtype(spec) == dtype
    assert not [w for w in recwarn if issubclass(w.category, T5PrecisionWarning)]


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_kbit_bases_load_quantized_without_fp16(tiny_dir, quant):
    bnb = pytest.importorskip("bitsandbytes")

    extra = {"load_in_8bit": True} if quant == "8bit" else {"adapter": "qlora"}
    spec, pm = make_spec("t5", path=str(tiny_dir), **extra)
    spec.torch_dtype = safe_dtype(spec)
    model = pm.hook.plugtune_load(spec=spec).model
    cls = bnb.nn.Linear8bitLt if quant == "8bit" else bnb.nn.Linear4bit
    q = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, cls)
    if quant == "4bit":  # compute dtype follows the safe dtype (fp32 on CPU, bf16 on CUDA)
        assert q.compute_dtype == (torch.bfloat16 if _policy.cuda_supports_bf16() else torch.float32)
    assert torch.float16 not in {p.dtype for p in model.parameters()}
