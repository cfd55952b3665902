"""``plugtune estimate``: exact parameter/adapter/quantized-weight bytes, ZeRO partitioning, the
CLI verdict, and the peak against measured peaks of real training steps on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from plugtune.config import validate_recipe
from plugtune.estimate import EstimateError, estimate, human, measure_peak, nf4_bytes, parse_memory
from plugtune.testing import shared_path


def _recipe(model, **kw):
    data = dict(
        base_model=str(model), adapter="lora", lora_target_modules="all-linear",
        chat_template="alpaca",
        datasets=[dict(path=str(shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")),
                       type="text", columns={"text": "response"})],
        sequence_len=256, sample_packing=True, micro_batch_size=8, max_steps=2, logging_steps=1,
        save_total_limit=1)
    data.update(kw)
    return validate_recipe(data)


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 1024**3
    assert parse_memory("80GB") == 80 * 1000**3
    assert parse_memory("1.5 mib") == int(1.5 * 1024**2)
    assert parse_memory(123) == 123
    with pytest.raises(EstimateError, match="24GiB"):
        parse_memory("24 gigs")


def test_counts_match_the_real_model_and_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    path = shared_path("models", "stories260K", "hf")
    real = AutoModelForCausalLM.from_pretrained(path)
    n = sum(p.numel() for p in real.parameters())
    full = estimate(_recipe(path, adapter="none", output_dir=str(tmp_path)), device="cpu")
    assert full.params == n == full.trainable_params
    assert full.weights == 4 * n and full.gradients == 4 * n
    assert full.optimizer_states == 8 * n  # AdamW: two fp32 states per trainable parameter
    lora = estimate(_recipe(path, lora_r=8, output_dir=str(tmp_path)), device="cpu")
    peft = get_peft_model(real, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora.trainable_params == trainable and lora.adapter == 4 * trainable
    assert lora.optimizer_states == 8 * trainable
    sgd = estimate(_recipe(path, optimizer="sgd", output_dir=str(tmp_path)), device="cpu")
    assert sgd.optimizer_states == 0
    bf16 = estimate(_recipe(path, adapter="none", output_dir=str(tmp_path)), device="cuda")
    assert bf16.weights == 2 * n and bf16.details["dtype"] == "bfloat16"  # dtype: auto on CUDA


def test_4bit_weights_match_bitsandbytes(tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    path = shared_path("models", "stories260K", "hf")
    est = estimate(_recipe(path, adapter="qlora", output_dir=str(tmp_path)), device="cpu")
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    actual = sum(p.numel() * p.element_size() for p in q.parameters())
    for mod in q.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            state = mod.weight.quant_state.as_dict(packed=False)
            actual += sum(v.numel() * v.element_size() for v in state.values()
                          if isinstance(v, torch.Tensor))
    assert est.weights == pytest.approx(actual, rel=0.01)
    assert nf4_bytes(4096 * 4096) / (4096 * 4096) == pytest.approx(0.5 + 1 / 64, abs=1e-3)


def test_zero_partitions_per_gpu(tmp_path):
    path = shared_path("models", "stories260K", "hf")
    one = estimate(_recipe(path, adapter="none", output_dir=str(tmp_path)), device="cuda")
    z2 = estimate(_recipe(path, adapter="none", deepspeed="zero2", output_dir=str(tmp_path)),
                  device="cuda", num_gpus=4)
    assert z2.optimizer_states == one.optimizer_states // 4
    assert z2.gradients == one.gradients // 4 and z2.weights == one.weights
    z3 = estimate(_recipe(path, adapter="none", deepspeed="zero3", output_dir=str(tmp_path)),
                  device="cuda", num_gpus=4)
    assert z3.weights == one.weights // 4
    off = estimate(_recipe(path, adapter="none", deepspeed="zero3_offload",
                           output_dir=str(tmp_path)), device="cuda", num_gpus=4)
    assert off.optimizer_states == 0 and off.weights == 0
    assert off.details["offloaded_to_cpu"] >= z3.optimizer_states + z3.weights - 4


def test_checkpointing_and_length_scale_activations(tmp_path):
    path = shared_path("models", "stories260K", "hf")
    base = estimate(_recipe(path, output_dir=str(tmp_path)), device="cpu")
    gc = estimate(_recipe(path, gradient_checkpointing=True, output_dir=str(tmp_path)), device="cpu")
    assert gc.activations == base.activations_with_checkpointing < base.activations
    assert gc.activations_without_checkpointing == base.activations
    double = estimate(_recipe(path, micro_batch_size=16, output_dir=str(tmp_path)), device="cpu")
    assert double.activations == pytest.approx(2 * base.activations, rel=1e-6)
    eager = estimate(_recipe(path, attn_implementation="eager", output_dir=str(tmp_path)),
                     device="cpu")
    assert eager.activations > base.activations  # softmax probabilities are kept


@pytest.mark.parametrize("rl,pairs,reference", [
    ("dpo", True, True), ("ipo", True, True), ("kto", True, True), ("orpo", True, False),
    ("simpo", True, False), ("reward", True, False), (None, False, False)])
def test_alignment_methods_pair_batches_and_reference_copies(tmp_path, rl, pairs, reference):
    """Pair methods hold 2b rows; full-weight DPO/IPO/KTO add a frozen copy of the weights."""
    path = shared_path("models", "stories260K", "hf")
    sft = estimate(_recipe(path, adapter="none", output_dir=str(tmp_path)), device="cpu")
    kw = {"reward_model": True} if rl == "reward" else ({"rl": rl} if rl else {})
    est = estimate(_recipe(path, adapter="none", output_dir=str(tmp_path), **kw), device="cpu")
    assert est.activations == pytest.approx((2 if pairs else 1) * sft.activations, rel=1e-6)
    assert est.details["dpo_reference_copy"] == (est.weights // 2 if reference else 0)


def test_cli_says_whether_it_fits(tmp_path, capsys):
    from plugtune.cli import main

    path = shared_path("models", "stories260K", "hf")
    common = ["estimate", "stories260k-dolly-lora", "--set", f"base_model={path}",
              "--set", f"datasets.0.path={tmp_path / 'unused.jsonl'}", "--device", "cpu"]
    assert main([*common, "--device-memory", "1GiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fits" in out and "activations, gradient checkpointing" in out
    assert main([*common, "--device-memory", "1MiB"]) == 1
    assert "does NOT fit" in " ".join(capsys.readouterr().out.split())
    assert main([*common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak"] > data["weights"] > 0 and data["fits"] is None


# -- against measured peaks (fresh process per run; CPU: RSS high-water mark) ------------------

def _tiny_llama(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                      max_position_embeddings=1024)
    path = tmp_path / "tiny-llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(shared_path("models", "stories260K", "hf")).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model,adapter,gc", [
    ("stories260K", "lora", False),  # the real 260K model, LoRA on all linear layers
    ("tiny-llama", "none", True),    # hidden 256 x 4 layers, full fine-tune + checkpointing
])
def test_estimate_within_25_percent_of_measured_peak(tmp_path, model, adapter, gc):
    path = shared_path("models", "stories260K", "hf") if model == "stories260K" else _tiny_llama(tmp_path)
    recipe = _recipe(path, adapter=adapter, gradient_checkpointing=gc, output_dir=str(tmp_path / "run"))
    est = estimate(recipe)
    measured = measure_peak(recipe)["measured_peak"]
    ratio = est.peak / measured
    print(f"{model} {adapter} gc={gc}: estimate {human(est.peak)}, measured {human(measured)}, "
          f"ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25
