"""QLoRA / 8-bit, gradient checkpointing, packing and generation for Falcon on CPU."""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter

import pytest
import torch
from transformers import FalconForCausalLM

from plugtune.config import validate_recipe
from plugtune.modeling import load_model
from plugtune.testing import make_spec
from plugtune.train import apply_adapter, read_model_type

VARIANTS = ["multi_query", "new_decoder"]
BLOCK_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _spec(path, **recipe):
    mt, cfg = read_model_type(str(path))
    spec, pm = make_spec(mt, path=str(path), **recipe)
    return spec.replace(hf_config=cfg), pm


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_qlora_really_quantizes(tiny_dirs, variant, legacy):
    import bitsandbytes as bnb

    spec, pm = _spec(tiny_dirs(variant, legacy), adapter="qlora")
    model = pm.hook.plugtune_load(spec=spec).model
    layers = _block_linears(model)
    assert len(layers) == 4 * 2
    for name, mod in layers.items():
        assert isinstance(mod, bnb.nn.Linear4bit), f"{name} is {type(mod).__name__}"
        assert mod.weight.quant_type == "nf4" and mod.weight.compress_statistics  # double quant
        assert mod.compute_dtype == torch.bfloat16


def test_native_falcon_class_is_not_quantized_by_transformers(tiny_dirs):
    """Why the plugin loads its own class: transformers skips FalconLinear (not `is nn.Linear`)."""
    import bitsandbytes as bnb

    spec, _ = _spec(tiny_dirs("multi_query"), adapter="qlora")
    plain = load_model(spec, auto_class=FalconForCausalLM)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in _block_linears(plain).values())


def test_8bit_quantizes_and_warns_once(tiny_dirs, caplog):
    import bitsandbytes as bnb

    spec, pm = _spec(tiny_dirs("multi_query"), adapter="lora", load_in_8bit=True)
    loaded = pm.hook.plugtune_load(spec=spec)
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in _block_linears(loaded.model).values())
    model = apply_adapter(spec, loaded.model, pm)
    ids = torch.randint(0, 2000, (2, 16))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            loss = pm.hook.plugtune_train_step(spec=spec, model=model,
                                               batch={"input_ids": ids, "labels": ids},
                                               num_items_in_batch=None)
            loss.backward()
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1, f"{len(casts)} MatMul8bitLt warnings"
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_lora_gets_grads_without_warning_flood(tiny_dirs, variant):
    spec, pm = _spec(tiny_dirs(variant), adapter="qlora", gradient_checkpointing=True,
                     lora_target_modules="all-linear")
    model = apply_adapter(spec, pm.hook.plugtune_load(spec=spec).model, pm)
    model.train()
    ids = torch.randint(0, 2000, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a per-step warning shows up twice
            model.zero_grad()
            loss = pm.hook.plugtune_train_step(spec=spec, model=model,
                                               batch={"input_ids": ids, "labels": ids},
                                               num_items_in_batch=None)
            loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    repeated = {m: c for m, c in Counter(str(w.message)[:80] for w in caught).items() if c > 1}
    assert not repeated, f"warnings repeated every step: {repeated}"


@pytest.mark.parametrize("variant", ["multi_query", "new_decoder", "alibi"])
def test_packed_rows_match_each_sample_alone(tiny_dirs, variant):
    from plugtune.data.packing import pack_rows

    spec, pm = _spec(tiny_dirs(variant))
    loaded = pm.hook.plugtune_load(spec=spec)
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(20, 2000, (n,), generator=g).tolist() for n in (11, 7))
    rows = pack_rows([a, b], [a, b], 32)
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=loaded.tokenizer)
    batch = collate([{k: v[0] for k, v in rows.items()}])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in (a, b)]
    assert torch.allclose(packed[:11], alone[0], atol=1e-4)
    assert torch.allclose(packed[11:18], alone[1], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant,legacy", [("multi_query", False), ("new_decoder", True)])
def test_qlora_run_then_generate(tiny_dirs, chat_jsonl, tmp_path, variant, legacy):
    from plugtune.runs import load_run
    from plugtune.train import train

    out = tmp_path / "run"
    rec = validate_recipe(dict(
        base_model=str(tiny_dirs(variant, legacy)), adapter="qlora", lora_r=8,
        lora_target_modules="all-linear", datasets=[{"path": str(chat_jsonl), "type": "alpaca"}],
        chat_template="alpaca", sequence_len=64, micro_batch_size=4, max_steps=2,
        logging_steps=1, learning_rate=1e-3, output_dir=str(out)))
    res = train(rec)
    m = res.metrics
    assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
    assert 0 < m["trainable_share"] < 0.05
    assert (out / "adapter_model.safetensors").is_file()
    spec, loaded, pm = load_run(out)
    outs = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=loaded.tokenizer,
                                     prompts=["Add 2 and 2.", "Add 10 and 1."], max_new_tokens=4,
                                     images=None)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_target_modules_auto_all_linear_and_explicit():
    from transformers import AutoModelForCausalLM

    from plugtune_falcon.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("new_decoder", 300))
    spec, pm = make_spec("falcon")
    tm = pm.hook.plugtune_target_modules
    assert tm(spec=spec, model=model, method="auto") == ["query_key_value"]
    assert tm(spec=spec, model=model, method="all-linear") == sorted(BLOCK_LINEARS)  # no lm_head
    with pytest.raises(ValueError, match=r"mlp \(FalconMLP\).*dense_h_to_4h"):
        tm(spec=spec, model=model, method=["query_key_value", "mlp"])
    with pytest.raises(ValueError, match=r"\['q_proj'\] not found.*query_key_value"):
        tm(spec=spec, model=model, method=["q_proj"])


@pytest.mark.parametrize("variant", ["multi_query", "new_decoder", "alibi"])
def test_packed_loss_through_the_loaded_stack_matches_unpacked(tiny_dirs, variant):
    """Through ``plugtune_load`` with ``sample_packing: true`` (whatever attention core installs
    for packed rows): a packed row's loss equals the same samples padded separately."""
    from plugtune.testing import packed_and_unpacked_loss

    spec, pm = _spec(tiny_dirs(variant), sample_packing=True)
    loaded = pm.hook.plugtune_load(spec=spec)
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(20, 2000, (n,), generator=g).tolist() for n in (30, 17)]
    lp, lu = packed_and_unpacked_loss(pm, spec, loaded.model.eval(), loaded.tokenizer, samples, 64)
    assert math.isclose(lp, lu, rel_tol=1e-5), (lp, lu)
