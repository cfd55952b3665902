"""BLOOM: eager attention, packed rows without cross-sample attention, fused LoRA targets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from plugtune.data.collate import Collator
from plugtune.data.packing import pack_rows
from plugtune.modeling import ModelLoadError, load_model
from plugtune.testing import make_spec
from plugtune_llama._bloom import UnpackingCollator, split_packed
from plugtune_llama.tiny import tiny_config


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("bloom", 300), attn_implementation="eager").eval()


def _samples():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in (12, 8, 5)]


def test_split_packed_recovers_samples():
    s = _samples()
    row = {k: v[0] for k, v in pack_rows(s, s, 32).items()}
    parts = split_packed(row)
    assert sorted(len(p["input_ids"]) for p in parts) == [5, 8, 12]
    assert all(p["labels"][0] == -100 and p["labels"][1:] == p["input_ids"][1:] for p in parts)


def test_packed_loss_equals_unpacked_and_plain_packing_leaks():
    model, s = _model(), _samples()
    spec, pm = make_spec("bloom")
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=type("T", (), {"pad_token_id": 3})())
    assert isinstance(collate, UnpackingCollator)
    rows = pack_rows(s, s, 32)
    feats = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    packed = collate(feats)
    assert "position_ids" not in packed and packed["input_ids"].shape[0] == 3
    plain = [{"input_ids": x, "labels": [-100, *x[1:]]} for x in s]
    unpacked = Collator(pad_token_id=3)(plain)
    n = int((unpacked["labels"] != -100).sum())
    leaky = Collator(pad_token_id=3)(feats)  # core's generic packed batch: BLOOM ignores positions
    with torch.no_grad():
        lp, lu, ll = (float(pm.hook.plugtune_train_step(spec=spec, model=model, batch=b,
                                                        num_items_in_batch=n))
                      for b in (packed, unpacked, leaky))
    assert math.isclose(lp, lu, rel_tol=1e-5)
    assert abs(ll - lu) > 1e-6  # without unpacking, samples attend to each other


def test_bloom_loads_eager_and_refuses_sdpa(tiny_dirs):
    path = str(tiny_dirs("bloom"))
    spec, pm = make_spec("bloom", path=path)
    assert pm.hook.plugtune_load(spec=spec).model.config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="scaled_dot_product_attention"):  # core's generic loader would do
        load_model(spec)
    spec2, _ = make_spec("bloom", path=path, attn_implementation="sdpa")
    with pytest.raises(ModelLoadError, match="only 'eager'"):
        pm.hook.plugtune_load(spec=spec2)


def test_bloom_targets():
    model = _model()
    spec, pm = make_spec("bloom")
    tm = pm.hook.plugtune_target_modules
    assert tm(spec=spec, model=model, method="auto") == ["query_key_value"]
    assert tm(spec=spec, model=model, method="all-linear") == [
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert tm(spec=spec, model=model, method=["query_key_value", "dense_4h_to_h"])
    with pytest.raises(ValueError, match=r"mlp \(BloomMLP\).*dense_h_to_4h"):
        tm(spec=spec, model=model, method=["mlp"])
    with pytest.raises(ValueError, match="q_proj.*not found.*query_key_value"):
        tm(spec=spec, model=model, method=["q_proj"])
