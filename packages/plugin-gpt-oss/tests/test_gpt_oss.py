"""gpt-oss loading quirks: attention choice, MXFP4 dequantization, packed rows, LoRA training
through ``plugtune.train``."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from plugtune.architectures import install_packed_masks
from plugtune.config import validate_recipe
from plugtune.modeling import ModelLoadError
from plugtune.plugins import resolve_family
from plugtune.testing import make_spec, packed_and_unpacked_loss
from plugtune_gpt_oss import _load
from plugtune_gpt_oss.plugin import ATTENTION_TARGETS, FAMILY
from plugtune_gpt_oss.tiny import tiny_config


def test_family_declares_its_contract(pm):
    route = resolve_family(pm, "gpt_oss")
    assert route.plugin.endswith("plugtune_gpt_oss.plugin") or route.plugin == "plugtune-gpt-oss"
    assert route.family == FAMILY
    assert FAMILY.attn_implementation == "eager" and FAMILY.packing == "exact"
    assert FAMILY.quirks and FAMILY.tests
    here = {f"{p.parent.name}/{p.name}" for p in __import__("pathlib").Path(__file__).parent.glob("*.py")}
    for t in FAMILY.tests:  # every declared test exists and names a test function
        path, name = t.split("::")
        assert f"tests/{path.rsplit('/', 1)[-1]}" in here, t
        mod = __import__("pathlib").Path(__file__).parent / path.rsplit("/", 1)[-1]
        assert f"def {name.split('[')[0]}(" in mod.read_text(), t


def test_sdpa_is_refused_by_transformers_and_eager_loads(tiny_dir, pm):
    """The reason for the quirk (sdpa raises) and the plugin's answer (eager)."""
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_config(tiny_config(300), attn_implementation="sdpa")
    spec, pm = make_spec("gpt_oss", path=str(tiny_dir), pm=pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    assert loaded.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("recipe,impl,notice", [
    ({}, "eager", "sdpa has no attention sinks"),
    ({"attn_implementation": "sdpa"}, "eager", "'sdpa' is not supported"),
    ({"flash_attention": True}, "eager", "needs CUDA"),
    ({"attn_implementation": "flash_attention_2"}, "eager", "needs CUDA"),
    ({"attn_implementation": "flex_attention"}, "flex_attention", None),
    ({"attn_implementation": "eager"}, "eager", None),
    ({"attn_implementation": _load.FLASH_KERNEL}, _load.FLASH_KERNEL, None),
])
def test_attention_choice(recipe, impl, notice):
    if torch.cuda.is_available() and notice == "needs CUDA":
        pytest.skip("the CPU fallback is what is checked here")
    rec = validate_recipe({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "messages"}],
                           **recipe})
    got, note = _load.choose_attention(rec)
    assert got == impl
    assert (note is None) if notice is None else (notice in note)


@pytest.mark.parametrize("quant,mxfp4", [(None, False), ({"quant_method": "mxfp4"}, True),
                                         ({"quant_method": "bitsandbytes"}, False)])
def test_mxfp4_config_is_dequantized_to_bf16(pm, quant, mxfp4):
    from transformers import Mxfp4Config

    cfg = tiny_config(300) if quant is None else tiny_config(300, quantization_config=quant)
    spec, _ = make_spec("gpt_oss", pm=pm)
    kwargs, notes = _load.load_kwargs(spec.replace(hf_config=cfg))
    assert kwargs["attn_implementation"] == "eager"
    if mxfp4:
        assert isinstance(kwargs["quantization_config"], Mxfp4Config)
        assert kwargs["quantization_config"].dequantize is True
        assert kwargs["dtype"] == torch.bfloat16
        assert sum("MXFP4" in n for _, n in notes) == 1
    else:
        assert "quantization_config" not in kwargs and not any("MXFP4" in n for _, n in notes)
    assert _load.is_mxfp4(cfg.to_dict()) == mxfp4


def test_mxfp4_with_bitsandbytes_is_refused(pm):
    spec, _ = make_spec("gpt_oss", pm=pm, adapter="qlora")
    cfg = tiny_config(300, quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ModelLoadError, match="MXFP4.*load_in_4bit"):
        _load.load_kwargs(spec.replace(hf_config=cfg))


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(300, sliding_window=4),
                                            attn_implementation="eager").eval()


class _PadTok:
    pad_token_id = 0


def test_packed_logits_equal_each_sample_alone(pm):
    """Window 4 < sample lengths: the packed masks keep samples apart in both layer kinds;
    without them (transformers' own forward) the second sample sees the first."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(5, 300, (n,), generator=g).tolist() for n in (13, 9))
    ids = torch.tensor([a + b])
    pos = torch.tensor([list(range(13)) + list(range(9))])
    with torch.no_grad():
        leaky = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    assert install_packed_masks(model)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in (a, b)]
    torch.testing.assert_close(packed[:13], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[13:], alone[1], atol=1e-5, rtol=0)
    assert (leaky[13:] - alone[1]).abs().max() > 1e-2, "the quirk is gone: revisit install_packed_masks"
    # and through the plugin's hooks: packed loss == unpacked loss
    spec, pm = make_spec("gpt_oss", pm=pm)
    lp, lu = packed_and_unpacked_loss(pm, spec, model, _PadTok(), [a, b], 32)
    assert math.isclose(lp, lu, rel_tol=1e-5)


def test_packed_loss_with_router_aux_loss_equals_unpacked(pm):
    """With the router auxiliary loss on (``output_router_logits``, as core's MoE setup turns it
    on), a full packed row (no padding tail) gives the unpacked loss, auxiliary term included."""
    model = _model()
    install_packed_masks(model)
    model.config.output_router_logits = True
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randint(5, 300, (n,), generator=g).tolist() for n in (11, 7))
    spec, pm = make_spec("gpt_oss", pm=pm)
    lp, lu = packed_and_unpacked_loss(pm, spec, model, _PadTok(), [a, b], 18)
    model.config.output_router_logits = False
    lp0, _ = packed_and_unpacked_loss(pm, spec, model, _PadTok(), [a, b], 18)
    assert math.isclose(lp, lu, rel_tol=1e-5)
    assert lp - lp0 > 1e-6  # the auxiliary term is really in the loss


@pytest.mark.parametrize("method", ["auto", "all-linear"])
def test_default_targets_are_the_attention_projections(pm, method):
    model = _model()
    spec, pm = make_spec("gpt_oss", pm=pm)
    assert pm.hook.plugtune_target_modules(spec=spec, model=model, method=method) == list(
        ATTENTION_TARGETS)
    with pytest.raises(ValueError, match="not layers LoRA can wrap"):
        pm.hook.plugtune_target_modules(spec=spec, model=model, method=["mlp"])


def test_lora_trains_two_steps_through_plugtune_train(tiny_dir, reasoning_jsonl, tmp_path, pm):
    """messages with ``developer`` and ``thinking`` keys, packed, eager: 2 LoRA steps."""
    from plugtune.train import train

    torch.set_num_threads(1)
    rec = validate_recipe(dict(
        base_model=str(tiny_dir), adapter="lora", lora_dropout=0.0, reasoning_effort="low",
        datasets=[dict(path=str(reasoning_jsonl), type="messages")], sample_packing=True,
        sequence_len=256, micro_batch_size=2, learning_rate=1e-3, max_steps=2, logging_steps=1,
        output_dir=str(tmp_path / "run")), pm=pm)
    res = train(rec, pm=pm)
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    import json

    cfg = json.loads((res.output_dir / "adapter_config.json").read_text())
    # leaf names, or full module names (core's MoE target resolution)
    assert {n.rsplit(".", 1)[-1] for n in cfg["target_modules"]} == set(ATTENTION_TARGETS)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(res.output_dir)
    assert "Reasoning: low" in saved.apply_chat_template([{"role": "user", "content": "x"}],
                                                         tokenize=False)


def test_mxfp4_checkpoint_loads_dequantized_and_trains(tmp_path, pm):
    """A checkpoint in the released MXFP4 layout (uint8 blocks + scales), loaded through the
    plugin on CPU: experts unpacked to bf16 with the values the blocks encode, no quantizer
    left on the model, and a LoRA step gives finite loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model

    from plugtune.testing import load_shared_tokenizer
    from plugtune.train import build_spec
    from plugtune_gpt_oss.tiny import save_tiny_mxfp4

    d = save_tiny_mxfp4(tmp_path / "mxfp4", load_shared_tokenizer("llama3_2"))
    rec = validate_recipe({"base_model": str(d), "adapter": "lora", "dtype": "bf16",
                           "datasets": [{"path": "d.jsonl", "type": "messages"}]}, pm=pm)
    spec = build_spec(rec, pm)
    model = pm.hook.plugtune_load(spec=spec).model
    for layer in model.model.layers:
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer.mlp.experts, proj)
            assert w.dtype == torch.bfloat16
            assert [w[e].unique().tolist() for e in range(w.shape[0])] == [
                [2.0 ** e] for e in range(w.shape[0])]
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    targets = pm.hook.plugtune_target_modules(spec=spec, model=model, method="auto")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    loss = pm.hook.plugtune_train_step(spec=spec, model=peft_model,
                                       batch={"input_ids": ids, "labels": ids,
                                              "attention_mask": torch.ones_like(ids)},
                                       num_items_in_batch=None)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in peft_model.named_parameters() if "lora_" in n)


def _core_has_chat_rows() -> bool:
    from plugtune import hookspecs

    return hasattr(hookspecs, "plugtune_chat_rows")


@pytest.mark.skipif(not _core_has_chat_rows(), reason="core without plugtune_chat_rows")
def test_reasoning_on_every_turn_trains_through_plugtune_train(tiny_dir, tmp_path, pm):
    """Two answered turns with reasoning in every record: the plugin's rows (turn 1 in a row of
    its own) tokenize and train through core's pipeline."""
    import json

    from plugtune.train import train

    rows = [{"messages": [
        {"role": "user", "content": f"Add {a} and {b}."},
        {"role": "assistant", "content": f"{a + b}.", "thinking": f"{a} plus {b}."},
        {"role": "user", "content": "Doubled?"},
        {"role": "assistant", "content": f"{2 * (a + b)}.", "thinking": "Times two."}]}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "r.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    torch.set_num_threads(1)
    rec = validate_recipe(dict(
        base_model=str(tiny_dir), adapter="lora", lora_dropout=0.0,
        datasets=[dict(path=str(data), type="messages")], sequence_len=256, micro_batch_size=2,
        max_steps=2, logging_steps=1, output_dir=str(tmp_path / "run")), pm=pm)
    res = train(rec, pm=pm)
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
