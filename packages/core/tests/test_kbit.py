"""4-bit bases: the fp16 trap and bitsandbytes' CPU kernel shape limits."""

from __future__ import annotations

import pytest
import torch

from plugtune.kbit import cpu_4bit_fallback, kbit_dtype, unsupported_cpu_4bit_layers


def test_fp16_with_4bit_base_takes_bf16_where_it_exists_else_warns():
    assert kbit_dtype(torch.float16, "4bit", bf16_available=True)[0] == torch.bfloat16
    dtype, note = kbit_dtype(torch.float16, "4bit", bf16_available=False)
    assert dtype == torch.float16 and "underflow" in note
    assert kbit_dtype(torch.float16, None, bf16_available=True) == (torch.float16, None)
    assert kbit_dtype(torch.float32, "4bit", bf16_available=True) == (torch.float32, None)


def test_tiny_4bit_model_evaluates_on_cpu_through_the_fallback(tmp_path, make_tiny_llama):
    """Hidden 32 < blocksize 64: the packed AVX512-BF16 kernel crashes on these shapes
    (``shape '[32, 0]' is invalid``); after the fallback eval-mode forward works."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama(64).save_pretrained(tmp_path / "m")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    assert unsupported_cpu_4bit_layers(model)
    assert cpu_4bit_fallback(model) == len(unsupported_cpu_4bit_layers(model))
    with torch.no_grad():
        eval_logits = model(ids).logits
    model.train()
    with torch.no_grad():  # the training path: what the fallback must agree with
        train_logits = model(ids).logits
    assert torch.isfinite(eval_logits).all()
    assert torch.allclose(eval_logits, train_logits)
