"""Recipe keys from axolotl configs honoured at train time: CUDA-only optimizers and
flash_attention_2 fall back on CPU, evals/saves per epoch, DoRA, rsLoRA, LoRA+, special tokens."""

from __future__ import annotations

import logging

import pytest

from plugtune.modeling import apply_special_tokens, attn_implementation
from plugtune.testing import load_shared_tokenizer, make_spec
from plugtune.train import lora_config, training_kwargs
from plugtune.trainer_options import optimizer_name


def test_cuda_optimizers_fall_back_on_cpu_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING):
        assert optimizer_name("adamw_bnb_8bit", cuda=False) == "adamw_torch"
        assert optimizer_name("paged_adamw_32bit", cuda=False) == "adamw_torch"
    assert "needs a CUDA device" in caplog.text
    assert optimizer_name("adamw_bnb_8bit", cuda=True) == "adamw_bnb_8bit"
    assert optimizer_name("adamw_torch_fused", cuda=False) == "adamw_torch_fused"


def test_flash_attention_2_falls_back_to_sdpa_without_cuda(caplog):
    spec, _ = make_spec("causal_lm", attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING):
        assert attn_implementation(spec) == "sdpa"
    assert "flash_attention_2 asked for but" in caplog.text
    eager, _ = make_spec("causal_lm", attn_implementation="eager")
    assert attn_implementation(eager) == "eager"


def test_evals_and_saves_per_epoch_become_shares_of_the_run():
    spec, _ = make_spec("causal_lm", evals_per_epoch=4, saves_per_epoch=2, num_epochs=2,
                        optimizer="adamw_bnb_8bit", output_dir="/tmp/unused",
                        report_env={"WANDB_PROJECT": "p"})
    kw = training_kwargs(spec.recipe, spec, has_eval=True)
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == pytest.approx(1 / 8)
    assert kw["save_strategy"] == "steps" and kw["save_steps"] == pytest.approx(1 / 4)
    assert kw["optim"] == "adamw_torch"
    import os

    assert os.environ.pop("WANDB_PROJECT") == "p"


def test_report_to_without_its_library_is_dropped_with_a_notice(caplog, monkeypatch):
    import importlib.util

    from plugtune.trainer_options import available_reporters

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX")
                        else real(name, *a))
    with caplog.at_level(logging.WARNING):
        assert available_reporters(["tensorboard", "wandb"]) == "none"
    assert "pip install wandb" in caplog.text
    assert available_reporters("none") == "none"


def test_dora_and_rslora_reach_peft(make_tiny_llama):
    model = make_tiny_llama(64)
    spec, pm = make_spec("causal_lm", peft_use_dora=True, peft_use_rslora=True,
                         lora_target_modules=["q_proj", "v_proj"])
    cfg = lora_config(spec, model, pm)
    assert cfg.use_dora and cfg.use_rslora


def test_loraplus_gives_the_b_matrices_a_higher_learning_rate(make_tiny_llama):
    from peft import get_peft_model
    from transformers import TrainingArguments

    from plugtune.trainer_options import loraplus_optimizers

    model = make_tiny_llama(64)
    spec, pm = make_spec("causal_lm", loraplus_lr_ratio=16, lora_target_modules=["q_proj"],
                         learning_rate=1e-4)
    model = get_peft_model(model, lora_config(spec, model, pm))
    args = TrainingArguments(output_dir="/tmp/unused", learning_rate=1e-4, report_to="none",
                             use_cpu=True)
    opt, sched = loraplus_optimizers(spec.recipe, model, args)
    assert sched is None
    lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-4), pytest.approx(1.6e-3)]
    plain, _ = make_spec("causal_lm")
    assert loraplus_optimizers(plain.recipe, model, args) == (None, None)


def test_special_tokens_are_set_and_new_ones_added():
    tok = load_shared_tokenizer("llama3_2")
    n = len(tok)
    new = apply_special_tokens(tok, {"pad_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"})
    assert new == [] and tok.pad_token == "<|end_of_text|>" and len(tok) == n
    new = apply_special_tokens(tok, {"additional_special_tokens": ["<|tool|>"]})
    assert new == ["<|tool|>"] and len(tok) == n + 1
    assert tok.convert_tokens_to_ids("<|tool|>") == n


def test_adapter_targets_line_names_what_lora_wraps():
    """The console's trainable-parameters line says what the adapter wraps (users could only
    find default targets in adapter_config.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from plugtune.trainer import adapter_targets

    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=100))
    assert adapter_targets(model) == ""
    wrapped = get_peft_model(model, LoraConfig(target_modules=["v_proj", "q_proj"],
                                               modules_to_save=["lm_head"]))
    assert adapter_targets(wrapped) == " (LoRA on q_proj, v_proj; trained in full lm_head)"
