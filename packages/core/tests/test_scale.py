"""DeepSpeed presets and config validation, ZeRO-2 / ZeRO-3 steps on CPU (single process), and
the Flash Attention 2 policy."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from plugtune.scale import (
    PRESETS,
    DeepSpeedConfigError,
    deepspeed_available,
    deepspeed_config,
    presets_dir,
    zero_stage,
)
from plugtune.testing import make_spec, shared_path


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_presets_are_valid_hf_style_configs(name, stage):
    cfg = deepspeed_config(name)
    assert cfg == json.loads((presets_dir() / f"{name}.json").read_text())
    assert zero_stage(name) == stage == cfg["zero_optimization"]["stage"]
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key  # filled by transformers from the recipe
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the recipe's optimizer is used
    zero = cfg["zero_optimization"]
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = name.endswith("offload")
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload


def test_presets_cover_every_shipped_file():
    assert sorted(p.stem for p in presets_dir().glob("*.json")) == sorted(PRESETS)


def _write(tmp_path, cfg, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return str(p)


@pytest.mark.parametrize("cfg,match", [
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_sav": True}},
     r"zero_optimization\.stage3_gather_16bit_weights_on_model_sav: unknown key; did you mean "
     r"'stage3_gather_16bit_weights_on_model_save'"),
    ({"zero_optimization": {"stage": 5}}, r"zero_optimization\.stage: expected 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     r"offload_param: parameter offload needs stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
     r"offload_optimizer\.device: expected \"cpu\", \"nvme\" or \"none\""),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     r"offload_param\.nvme_path: required"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, r"bf16/fp16: both enabled"),
    ({"train_micro_batch_size_per_gpu": "four"}, r"train_micro_batch_size_per_gpu: expected a number"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
     r"zero_optimization\.reduce_bucket_size: expected a number"),
    ([1, 2], r"<root>: expected a JSON object"),
])
def test_invalid_configs_name_file_and_key(tmp_path, cfg, match):
    path = _write(tmp_path, cfg)
    with pytest.raises(DeepSpeedConfigError, match=match) as info:
        deepspeed_config(path)
    assert path in str(info.value)


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"did you mean 'zero3'\?"):
        deepspeed_config("zero_3")
    with pytest.raises(DeepSpeedConfigError, match="zero2, zero3, zero3_offload"):
        deepspeed_config("/no/such/ds.json")
    path = _write(tmp_path, '{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json:2: malformed JSON"):
        deepspeed_config(path)


def test_a_user_file_passes_and_round_trips(tmp_path):
    cfg = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
           "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"}
    assert deepspeed_config(_write(tmp_path, cfg)) == cfg


def test_recipe_key_is_validated_before_training(tmp_path):
    from plugtune.train import training_kwargs

    spec, _ = make_spec("causal_lm", deepspeed="zero4", output_dir=str(tmp_path))
    with pytest.raises(DeepSpeedConfigError, match="zero4"):
        training_kwargs(spec.recipe, spec, has_eval=False)


# -- real DeepSpeed steps (CPU, single process, in a subprocess so the process group and the
#    accelerate state of the DeepSpeed run do not leak into other tests) ---------------------

def _run_train(tmp_path, stage: str, adapter: str, naive_dir=None):
    if not deepspeed_available():
        pytest.skip("deepspeed is not installed (pip install 'plugtune[deepspeed]')")
    recipe = dict(
        base_model=str(shared_path("models", "stories260K", "hf")), adapter=adapter,
        deepspeed=stage, chat_template="alpaca", lora_target_modules="all-linear",
        datasets=[dict(path=str(shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")),
                       type="dolly", max_samples=8)],
        sequence_len=64, micro_batch_size=2, learning_rate=1e-3, max_steps=2, logging_steps=1,
        output_dir=str(tmp_path / "run"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            # also save the live parameters, as a plain save_pretrained would, into naive_dir
            + ("import plugtune.scale as s\n_gather = s.gathered_state_dict\n"
               "def gather(trainer):\n"
               f"    trainer.model.save_pretrained({str(naive_dir)!r})\n"
               "    return _gather(trainer)\n"
               "s.gathered_state_dict = gather\n" if naive_dir else "")
            + "from plugtune.cli import main; sys.exit(main(['train', sys.argv[1]]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code, str(rp)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
def test_zero2_step_on_cpu(tmp_path):
    """One ZeRO-2 run of a real tiny model (first run JIT-compiles DeepSpeed's CPU ops)."""
    from safetensors.torch import load_file

    run = _run_train(tmp_path, "zero2", "lora")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    ckpt = run / "checkpoint-2"
    # the checkpoint is DeepSpeed's (ZeRO-partitioned optimizer states), so ZeRO really ran
    assert list((ckpt / "global_step2").glob("*zero_pp_rank_0*optim_states.pt"))
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.slow
def test_zero3_saves_the_gathered_adapter(tmp_path):
    pytest.importorskip("deepspeed", reason="pip install 'plugtune[deepspeed]'")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = _run_train(tmp_path, "zero3", "lora", naive_dir=tmp_path / "naive")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["total_params"] > metrics["trainable_params"]  # partitioned params counted
    saved = load_file(run / "adapter_model.safetensors")
    # reference: the fp32 weights DeepSpeed itself reconstructs from its sharded checkpoint
    full = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoint-2"))
    lora = {k.replace(".default", ""): v for k, v in full.items() if "lora_" in k}
    assert len(saved) == len(lora) > 0
    for key, value in saved.items():
        assert value.shape == lora[key].shape and value.numel() > 0, key
        torch.testing.assert_close(value.float(), lora[key], rtol=1e-3, atol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # negative control: saving the live (partitioned) parameters writes empty tensors for every
    # parameter above stage3_param_persistence_threshold (smaller ones stay whole on each rank)
    naive = load_file(tmp_path / "naive" / "adapter_model.safetensors")
    empty = [k for k, v in naive.items() if v.numel() == 0]
    assert len(empty) > len(naive) // 2
    assert all(saved[k].numel() > 0 for k in empty)


# -- Flash Attention 2 policy -------------------------------------------------------------------

@pytest.mark.parametrize("cuda,installed,expected", [
    (True, True, "flash_attention_2"), (True, False, "sdpa"), (False, True, "sdpa"),
    (False, False, "sdpa")])
def test_flash_attention_policy(monkeypatch, caplog, cuda, installed, expected):
    import importlib.util

    from plugtune.modeling import attn_implementation

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn"
                        else real_find_spec(name, *a))
    spec, _ = make_spec("causal_lm", flash_attention=True)
    with caplog.at_level(logging.WARNING, logger="plugtune.modeling"):
        assert attn_implementation(spec) == expected
    notices = [r.getMessage() for r in caplog.records if "flash_attention" in r.getMessage()]
    if expected == "sdpa":
        assert len(notices) == 1 and "\n" not in notices[0]
        assert ("no CUDA device" if not cuda else "flash-attn is not installed") in notices[0]
    else:
        assert not notices
    off, _ = make_spec("causal_lm", flash_attention=False)
    assert attn_implementation(off) == "sdpa"
    forced, _ = make_spec("causal_lm", flash_attention=True, attn_implementation="eager")
    assert attn_implementation(forced) == "eager"
