"""LLaMA-Factory training YAML (``llamafactory-cli train FILE``) -> plugtune recipe.

Keys as LLaMA-Factory defines them (hiyouga/LLaMA-Factory ``src/llamafactory/hparams/``:
``ModelArguments``, ``DataArguments``, ``FinetuningArguments``) plus ``TrainingArguments``
(:mod:`plugtune.config.dialects._hf`). Detected by ``model_name_or_path`` together with
``stage`` or ``finetuning_type`` (keys plugtune and TRL never use). The named datasets
(``dataset: a,b`` + ``dataset_dir``) are read from ``dataset_info.json`` by
:func:`plugtune.data.registry.resolve_llamafactory`.
"""

from __future__ import annotations

from typing import Any

from plugtune.config.dialects import _hf
from plugtune.config.dialects.base import Translation, is_unset

NAME = "LLaMA-Factory"

#: LLaMA-Factory key -> plugtune key (same meaning)
RENAMED = {
    "model_name_or_path": "base_model", "model_revision": "revision",
    "trust_remote_code": "trust_remote_code", "cutoff_len": "sequence_len",
    "val_size": "val_set_size", "packing": "sample_packing", "train_on_prompt": "train_on_inputs",
    "preprocessing_num_workers": "dataset_num_proc", "lora_rank": "lora_r",
    "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_dora": "peft_use_dora",
    "use_rslora": "peft_use_rslora", "loraplus_lr_ratio": "loraplus_lr_ratio",
    "loraplus_lr_embedding": "loraplus_lr_embedding", "pref_beta": "dpo_beta",
    "dpo_label_smoothing": "dpo_label_smoothing", "simpo_gamma": "simpo_gamma",
    "kto_chosen_weight": "kto_desirable_weight", "kto_rejected_weight": "kto_undesirable_weight",
    "moe_aux_loss_coef": "moe_aux_loss_coef",
}
#: handled in :func:`translate`
HANDLED = {"stage", "finetuning_type", "lora_target", "additional_target", "dataset",
           "eval_dataset", "dataset_dir", "template", "max_samples", "quantization_bit",
           "quantization_method", "pref_loss", "flash_attn", "disable_gradient_checkpointing",
           "enable_liger_kernel"}
NOTED = {
    "overwrite_cache": "plugtune prepares data in memory each run",
    "plot_loss": "plugtune always writes the loss curve", "preprocessing_batch_size":
    "datasets' default batch", "image_max_pixels": "the processor's own size limits apply",
    "image_min_pixels": "the processor's own size limits apply",
    "video_max_pixels": "plugtune trains on images, not videos",
    "video_min_pixels": "plugtune trains on images, not videos", "video_fps": "no video",
    "video_maxlen": "no video", "media_dir": "image paths resolve against the dataset file",
    "tokenized_path": "no prepared copy is written", "compute_accuracy": "eval loss is reported",
    "use_fast_tokenizer": "AutoTokenizer loads the fast tokenizer", "cache_dir": "the hub cache",
    "print_param_status": "plugtune prints the trainable parameter count",
    "low_cpu_mem_usage": "transformers loads weights lazily", "double_quantization":
    "plugtune's 4-bit base always uses double quantization (NF4)", "quantization_type":
    "plugtune's 4-bit base is NF4", "ignore_pad_token_for_loss": "padding never counts in the loss",
}
REFUSED = {
    "ppo/rm-free stages": "", "adapter_name_or_path": "plugtune starts a new adapter",
    "use_unsloth": "plugtune has no unsloth kernels",
    "rope_scaling": "plugtune has no RoPE scaling override", "shift_attn": "no shifted attention",
    "mixture_of_depths": "no mixture-of-depths", "use_llama_pro": "no LLaMA Pro block expansion",
    "use_galore": "no GaLore", "use_badam": "no BAdam", "use_apollo": "no APOLLO",
    "use_adam_mini": "no Adam-mini", "pissa_init": "no PiSSA initialisation",
    "neat_packing": "plugtune packs with reset position ids (use packing: true)",
    "mask_history": "plugtune trains every assistant turn", "streaming": "no streaming datasets",
    "mix_strategy": "datasets are concatenated", "interleave_probs": "datasets are concatenated",
    "pref_ftx": "no SFT term in the preference loss", "freeze_vision_tower": None,
    "train_from_scratch": "plugtune fine-tunes pretrained weights", "resize_vocab": None,
    "new_special_tokens": "add tokens through special_tokens", "tool_format": None,
}
REFUSED = {k: v for k, v in REFUSED.items() if v}
_STAGES = {"sft": {}, "pt": {}, "dpo": {"rl": "dpo"}, "kto": {"rl": "kto"},
           "rm": {"reward_model": True}}
_PREF_LOSS = {"sigmoid": {}, "orpo": {"rl": "orpo"}, "simpo": {"rl": "simpo"},
              "hinge": {"dpo_loss_type": "hinge"}, "ipo": {"rl": "ipo"}}
_FLASH = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager"}
_DEEPSPEED = {"ds_z0_config.json": None, "ds_z2_config.json": "zero2",
              "ds_z2_offload_config.json": "zero2", "ds_z3_config.json": "zero3",
              "ds_z3_offload_config.json": "zero3_offload"}


def detect(data: dict[str, Any]) -> bool:
    """LLaMA-Factory: ``model_name_or_path`` with ``stage`` or ``finetuning_type``."""
    return "model_name_or_path" in data and ("stage" in data or "finetuning_type" in data)


def _names(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _datasets(names: list[str], dataset_dir: str, stage: str, max_samples: int | None,
              source: str, key: str) -> list[dict]:
    """The ``datasets`` entries of LLaMA-Factory dataset names, read from ``dataset_info.json``
    by :func:`plugtune.data.registry.resolve_llamafactory` (plugtune's data package)."""
    from plugtune.config.schema import RecipeError

    try:
        from plugtune.data.registry import resolve_llamafactory
    except ImportError:
        raise RecipeError(
            f"LLaMA-Factory config {source}: {key}: {', '.join(names)}: this plugtune cannot read "
            "LLaMA-Factory's dataset_info.json (plugtune.data.registry is missing); list the "
            "files under datasets: instead") from None
    entries = resolve_llamafactory(names, dataset_dir, stage, max_samples=max_samples)
    return [e.model_dump(mode="json", exclude_unset=True) if hasattr(e, "model_dump") else dict(e)
            for e in entries]


def translate(data: dict[str, Any], source: str = "<recipe>") -> Translation:
    """Translate a LLaMA-Factory training YAML.

    Raises:
        plugtune.config.RecipeError: a stage, finetuning type or key plugtune cannot honour, or a
            key LLaMA-Factory does not have (with a "did you mean" for a plausible typo).
    """
    from plugtune.config.schema import RecipeError, did_you_mean

    d = {k: v for k, v in data.items() if not is_unset(v)}
    out: dict[str, Any] = {}
    notices: list[str] = []
    errors: list[str] = []
    stage = str(d.get("stage", "sft"))
    if stage not in _STAGES:
        errors.append(f"  stage: {stage!r}: plugtune has sft, pt, dpo, kto and rm (no PPO)")
    else:
        out.update(_STAGES[stage])
    ft = d.get("finetuning_type", "lora")
    if ft == "full":
        out["adapter"] = "none"
    elif ft == "lora":
        out["adapter"] = "lora"
    else:
        errors.append(f"  finetuning_type: {ft!r}: plugtune has lora and full (no freeze/oft)")
    qbit = d.get("quantization_bit")
    if qbit is not None:
        if d.get("quantization_method", "bnb") != "bnb" or int(qbit) not in (4, 8):
            errors.append(f"  quantization_bit: {qbit} ({d.get('quantization_method', 'bnb')}): "
                          "plugtune quantizes with bitsandbytes 4 or 8 bit only")
        elif int(qbit) == 4:
            out["adapter"] = "qlora" if ft == "lora" else out.get("adapter")
        else:
            out["load_in_8bit"] = True
    if stage in _STAGES and "pref_loss" in d and stage == "dpo":
        out.update(_PREF_LOSS.get(str(d["pref_loss"]), {}))
        if str(d["pref_loss"]) not in _PREF_LOSS:
            errors.append(f"  pref_loss: {d['pref_loss']!r}: plugtune has sigmoid, hinge, ipo, "
                          "orpo, simpo")
    target = d.get("lora_target", "all")
    out["lora_target_modules"] = "all-linear" if target == "all" else _names(target)
    if "additional_target" in d:
        out["lora_modules_to_save"] = _names(d["additional_target"])
    # LLaMA-Factory's own defaults where plugtune's differ
    out["lora_r"] = 8
    out["lora_alpha"] = int(d.get("lora_rank", 8)) * 2
    out["lora_dropout"] = 0.0
    out["sequence_len"] = 2048
    out["group_by_length"] = False
    if "template" in d:
        out["chat_template"] = _template(str(d["template"]), notices)
    if "flash_attn" in d and d["flash_attn"] != "auto":
        out["attn_implementation"] = _FLASH.get(str(d["flash_attn"]), "sdpa")
    if d.get("disable_gradient_checkpointing"):
        out["gradient_checkpointing"] = False
    if "enable_liger_kernel" in d:  # Liger's fused kernels (plugtune[liger], CUDA only)
        out["liger_kernel"] = bool(d["enable_liger_kernel"])
    for k, v in d.items():
        if k in RENAMED:
            out[RENAMED[k]] = v
            if k == "cutoff_len":
                notices.append(f"cutoff_len: sequence_len: {v}; LLaMA-Factory truncates prompt "
                               "and response to fit, plugtune drops samples that do not fit")
        elif k in NOTED:
            notices.append(f"{k}: ignored ({NOTED[k]})")
        elif k in REFUSED:
            if v is not False:
                errors.append(f"  {k}: {v!r} is LLaMA-Factory's, but {REFUSED[k]}")
        elif k in HANDLED or _hf.known(k):
            continue
        elif k in _hf.TRAINING_ARGUMENTS:
            errors.append(f"  {k}: a TrainingArguments key plugtune does not expose")
        else:
            errors.append(f"  {k}: unknown LLaMA-Factory key"
                          f"{did_you_mean(k, [*RENAMED, *HANDLED, *NOTED, *REFUSED])}")
    resume = _hf.translate_training(d, out, notices, errors)
    if "deepspeed" in out:
        out["deepspeed"] = _deepspeed(str(out["deepspeed"]), notices)
        if out["deepspeed"] is None:
            del out["deepspeed"]
    if "dataset" in d:
        ddir = str(d.get("dataset_dir", "data"))
        if not errors:
            out["datasets"] = _datasets(_names(d["dataset"]), ddir, stage, d.get("max_samples"),
                                        source, "dataset")
            if "eval_dataset" in d:
                out["test_datasets"] = _datasets(_names(d["eval_dataset"]), ddir, stage,
                                                 d.get("max_samples"), source, "eval_dataset")
    if errors:
        raise RecipeError(f"LLaMA-Factory config {source}: keys plugtune cannot honour:\n"
                          + "\n".join(errors))
    return Translation(data=out, dialect=NAME, notices=notices, resume=resume)


def _template(name: str, notices: list[str]) -> str:
    """LLaMA-Factory template name -> plugtune chat_template.

    LLaMA-Factory's templates for instruct models follow the model's own chat template, so
    they map to ``tokenizer`` (the template the tokenizer ships; it may add more, e.g. the date
    block of Llama 3.x's template, which LLaMA-Factory's ``llama3`` omits); plugtune's named templates
    (alpaca, chatml, ...) keep their names.
    """
    if name in ("alpaca", "chatml", "mistral", "zephyr", "llama2", "vicuna"):
        return {"llama2": "llama2", "vicuna": "alpaca"}.get(name, name)
    if name in ("empty", "default"):
        notices.append(f"template: {name}: using plugtune's plain template")
        return "plain"
    notices.append(f"template: {name}: using the tokenizer's own chat template (close to "
                   f"LLaMA-Factory's {name!r} template; they differ where the tokenizer's "
                   "template adds more, e.g. Llama 3.x's date/system block)")
    return "tokenizer"


def _deepspeed(value: str, notices: list[str]) -> str | None:
    """LLaMA-Factory's example DeepSpeed files (``examples/deepspeed/ds_z3_config.json``) ->
    plugtune's bundled configs of the same ZeRO stage; another path is kept as is."""
    from pathlib import Path

    if Path(value).is_file():
        return value
    name = Path(value).name
    if name in _DEEPSPEED:
        bundled = _DEEPSPEED[name]
        notices.append(f"deepspeed: {value}: using plugtune's bundled "
                       f"{bundled or 'no DeepSpeed (ZeRO-0)'}")
        return bundled
    return value
