"""Mistral quirks: sliding window in packed rows, padding sides, Zephyr template, k-bit + GC."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from plugtune.config import validate_recipe
from plugtune.data.packing import pack_rows
from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.testing import make_spec, packed_and_unpacked_loss
from plugtune.train import apply_adapter
from plugtune_mistral.tiny import tiny_config


def _packed_setup(sliding_window):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(200, sliding_window=sliding_window)).eval()
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(5, 200, (n,), generator=g).tolist() for n in (13, 9))
    spec, pm = make_spec("mistral")
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=_PadTok())
    rows = pack_rows([a, b], [a, b], 32)
    batch = collate([{k: v[0] for k, v in rows.items()}])
    return model, spec, pm, a, b, batch


class _PadTok:
    pad_token_id = 0


def test_sliding_window_is_exact_in_packed_rows():
    """Window 4 < sample lengths 13 and 9: packed logits equal each sample run alone."""
    model, spec, pm, a, b, batch = _packed_setup(sliding_window=4)
    assert "attention_mask" not in batch and "position_ids" in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in (a, b)]
        # the window really acts: the same weights without it give other logits
        full = AutoModelForCausalLM.from_config(tiny_config(200, sliding_window=None)).eval()
        full.load_state_dict(model.state_dict())
        no_window = full(input_ids=torch.tensor([a]), use_cache=False).logits[0]
        # and the cache trap of FINDINGS.md is real: with use_cache=True samples see each other
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=True).logits[0]
    assert torch.allclose(packed[:13], alone[0], atol=1e-5)
    assert torch.allclose(packed[13:22], alone[1], atol=1e-5)
    assert (no_window - alone[0]).abs().max() > 1e-3
    assert (cached[13:22] - alone[1]).abs().max() > 1e-3


def test_train_step_loss_of_packed_row_equals_unpacked_loss():
    model, spec, pm, a, b, batch = _packed_setup(sliding_window=4)
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=_PadTok())
    # the packed labels mask each sample's first token; mask it in the unpacked batch too
    lab = [[-100, *a[1:]], [-100, *b[1:]]]
    unpacked = collate([{"input_ids": a, "labels": lab[0]}, {"input_ids": b, "labels": lab[1]}])
    n = int((batch["labels"] != -100).sum())
    assert n == int((unpacked["labels"] != -100).sum())
    with torch.no_grad():
        lp = pm.hook.plugtune_train_step(spec=spec, model=model, batch=batch, num_items_in_batch=n)
        lu = pm.hook.plugtune_train_step(spec=spec, model=model, batch=unpacked, num_items_in_batch=n)
    assert math.isclose(float(lp), float(lu), rel_tol=1e-5)


def test_padding_sides(tiny_dir):
    spec, pm = make_spec("mistral", path=str(tiny_dir), chat_template="zephyr")
    loaded = pm.hook.plugtune_load(spec=spec)
    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token == "<unk>"
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tok)
    batch = collate([{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]},
                     {"input_ids": [1, 9], "labels": [-100, 9]}])
    assert batch["input_ids"][1].tolist() == [1, 9, tok.pad_token_id, tok.pad_token_id]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 9, -100, -100]


def test_batched_generation_equals_one_by_one_even_from_right_padding(tiny_dir):
    spec, pm = make_spec("mistral", path=str(tiny_dir), chat_template="zephyr")
    loaded = pm.hook.plugtune_load(spec=spec)
    model, tok = loaded.model, loaded.tokenizer
    ensure_chat_template(tok, "zephyr")
    tok.padding_side = "right"  # what a user's tokenizer may carry; the plugin must not use it
    prompts = ["Hi", "Write one long sentence about the sea and the wind, please."]
    batched = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=prompts,
                                        max_new_tokens=6, images=None)
    single = [pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=[p],
                                        max_new_tokens=6, images=None)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_zephyr_template_masks_prompt_and_trains_eos(mistral_tokenizer):
    tok = mistral_tokenizer
    ensure_chat_template(tok, "zephyr")
    info = probe_template(tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    # the saved template renders the BOS the tokenizer adds (template parity with training)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nCapital of France?</s>\n<|assistant|>\nParis.</s>\n"
    row = tokenize_chat(tok, msgs, info, 128)
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(trained).strip() == "Paris.</s>"
    assert trained[-1] == tok.eos_token_id and info.stop_token_ids == [tok.eos_token_id]
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1


@pytest.mark.parametrize("adapter", ["qlora", "8bit"])
def test_kbit_gradient_checkpointing_lora_grads_no_warning_flood(tiny_dir, adapter):
    import bitsandbytes as bnb

    kw = {"adapter": "qlora"} if adapter == "qlora" else {"adapter": "lora", "load_in_8bit": True}
    spec, pm = make_spec("mistral", path=str(tiny_dir), gradient_checkpointing=True,
                         lora_target_modules="all-linear", **kw)
    loaded = pm.hook.plugtune_load(spec=spec)
    kind = bnb.nn.Linear4bit if adapter == "qlora" else bnb.nn.Linear8bitLt
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, kind)
    model = apply_adapter(spec, loaded.model, pm)
    lora_on = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_on == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model.train()
    ids = torch.randint(3, 1000, (2, 24))  # longer than the window of 16
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


@pytest.mark.slow
def test_qlora_run_zephyr_then_generate(tiny_dir, chat_jsonl, tmp_path):
    from plugtune.runs import load_run
    from plugtune.train import train

    out = tmp_path / "run"
    rec = validate_recipe(dict(
        base_model=str(tiny_dir), adapter="qlora", lora_r=8, chat_template="zephyr",
        datasets=[{"path": str(chat_jsonl), "type": "alpaca"}], sequence_len=64,
        sample_packing=True, micro_batch_size=2, max_steps=2, logging_steps=1,
        learning_rate=1e-3, output_dir=str(out)))
    m = train(rec).metrics
    assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
    assert 0 < m["trainable_share"] < 0.05
    spec, loaded, pm = load_run(out)
    assert loaded.tokenizer.padding_side == "left"
    assert "<|assistant|>" in loaded.tokenizer.chat_template
    outs = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=loaded.tokenizer,
                                     prompts=["Add 2 and 2.", "Add 10 and 1."], max_new_tokens=4,
                                     images=None)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_target_modules_auto_all_linear_and_explicit():
    model = AutoModelForCausalLM.from_config(tiny_config(300))
    spec, pm = make_spec("mistral")
    tm = pm.hook.plugtune_target_modules
    assert tm(spec=spec, model=model, method="auto") == ["q_proj", "v_proj"]
    assert tm(spec=spec, model=model, method="all-linear") == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"\['query_key_value'\] not found.*q_proj"):
        tm(spec=spec, model=model, method=["q_proj", "query_key_value"])
    with pytest.raises(ValueError, match=r"mlp \(MistralMLP\)"):
        tm(spec=spec, model=model, method=["mlp"])


def test_packed_loss_through_the_loaded_stack_matches_unpacked(tiny_dir):
    """The same check through ``plugtune_load`` with ``sample_packing: true`` (whatever attention
    core installs for packed rows) and samples longer than the saved model's window of 16."""
    spec, pm = make_spec("mistral", path=str(tiny_dir), sample_packing=True)
    loaded = pm.hook.plugtune_load(spec=spec)
    model = loaded.model.eval()
    assert model.config.sliding_window == 16
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (40, 25)]
    lp, lu = packed_and_unpacked_loss(pm, spec, model, loaded.tokenizer, samples, 80)
    assert math.isclose(lp, lu, rel_tol=1e-5), (lp, lu)
