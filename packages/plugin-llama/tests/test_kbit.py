"""QLoRA / 8-bit and gradient checkpointing with LoRA for Llama 2, Llama 3.2, Qwen2.5 and BLOOM."""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter

import pytest
import torch

from plugtune.config import validate_recipe
from plugtune.testing import make_spec
from plugtune.train import apply_adapter

NAMES = ["llama2", "llama3", "qwen2", "bloom"]
# the 128k / 152k vocabularies make the Llama 3.2 and Qwen2.5 tiny models ~10x heavier
FAST = ["llama2", pytest.param("llama3", marks=pytest.mark.slow),
        pytest.param("qwen2", marks=pytest.mark.slow), "bloom"]
TEMPLATE = {"llama2": "llama2", "llama3": None, "qwen2": None, "bloom": "alpaca"}
FAMILY = {"llama2": "llama", "llama3": "llama", "qwen2": "qwen2", "bloom": "bloom"}
LINEARS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "bloom": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}


def _spec(tiny_dirs, name, **recipe):
    return make_spec(FAMILY[name], path=str(tiny_dirs(name)), **recipe)


@pytest.mark.parametrize("name", FAST)
def test_qlora_load_is_nf4_double_quant_bf16(tiny_dirs, name):
    import bitsandbytes as bnb

    spec, pm = _spec(tiny_dirs, name, adapter="qlora")
    model = pm.hook.plugtune_load(spec=spec).model
    layers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS[FAMILY[name]]]
    assert len(layers) == 2 * len(LINEARS[FAMILY[name]])
    for m in layers:
        assert isinstance(m, bnb.nn.Linear4bit)
        assert m.weight.quant_type == "nf4" and m.weight.compress_statistics
        assert m.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("name", FAST)
def test_gradient_checkpointing_qlora_all_linear(tiny_dirs, name):
    """Adapters on every block Linear (never lm_head / embeddings) get gradients through
    gradient checkpointing on a 4-bit base, and no warning repeats every step."""
    spec, pm = _spec(tiny_dirs, name, adapter="qlora", gradient_checkpointing=True,
                     lora_target_modules="all-linear")
    model = apply_adapter(spec, pm.hook.plugtune_load(spec=spec).model, pm)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
               if ".lora_A" in n}
    assert wrapped == LINEARS[FAMILY[name]]
    model.train()
    ids = torch.randint(3, 1000, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.zero_grad()
            loss = pm.hook.plugtune_train_step(spec=spec, model=model,
                                               batch={"input_ids": ids, "labels": ids},
                                               num_items_in_batch=None)
            loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    repeated = {m: c for m, c in Counter(str(w.message)[:80] for w in caught).items() if c > 1}
    assert not repeated, f"warnings repeated every step: {repeated}"


def test_bloom_8bit_lora_trains_and_warns_once(tiny_dirs, caplog):
    import bitsandbytes as bnb

    spec, pm = _spec(tiny_dirs, "bloom", adapter="lora", load_in_8bit=True)
    loaded = pm.hook.plugtune_load(spec=spec)
    assert isinstance(loaded.model.transformer.h[0].self_attention.query_key_value, bnb.nn.Linear8bitLt)
    model = apply_adapter(spec, loaded.model, pm)
    ids = torch.randint(3, 1000, (2, 16))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            loss = pm.hook.plugtune_train_step(spec=spec, model=model,
                                               batch={"input_ids": ids, "labels": ids},
                                               num_items_in_batch=None)
            loss.backward()
    assert math.isfinite(loss.item())
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_qlora_run_with_packing_then_generate(tiny_dirs, chat_jsonl, tmp_path, name):
    """``adapter: qlora`` through ``plugtune.train.train``: 2 steps on packed rows, the adapter
    saved, then the run reloaded (4-bit base + adapter) and generating without dtype errors."""
    from plugtune.runs import load_run
    from plugtune.train import train

    out = tmp_path / "run"
    rec = validate_recipe(dict(
        base_model=str(tiny_dirs(name)), adapter="qlora", lora_r=8, lora_target_modules="all-linear",
        chat_template=TEMPLATE[name], datasets=[{"path": str(chat_jsonl), "type": "alpaca"}],
        sequence_len=128, sample_packing=True, micro_batch_size=2, max_steps=2, logging_steps=1,
        learning_rate=1e-3, output_dir=str(out)))
    m = train(rec).metrics
    assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
    assert 0 < m["trainable_share"] < 0.05
    spec, loaded, pm = load_run(out)
    outs = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=loaded.tokenizer,
                                     prompts=["Add 2 and 2.", "Add 10 and 1."], max_new_tokens=4,
                                     images=None)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
