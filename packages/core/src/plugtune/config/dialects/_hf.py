"""The ``transformers.TrainingArguments`` keys that LLaMA-Factory and TRL configs share.

Both tools parse their YAML with ``HfArgumentParser`` into their own dataclasses plus
``TrainingArguments`` (or TRL's ``SFTConfig`` / ``DPOConfig``, which subclass it), so the
training keys are the same in both dialects and are translated here once.
"""

from __future__ import annotations

from typing import Any

#: TrainingArguments key -> plugtune recipe key (same meaning)
RENAMED = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "num_train_epochs": "num_epochs",
    "max_steps": "max_steps",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "optim": "optimizer",
    "seed": "seed",
    "gradient_checkpointing": "gradient_checkpointing",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "eval_steps": "eval_steps",
    "report_to": "report_to",
    "tf32": "tf32",
    "deepspeed": "deepspeed",
    "group_by_length": "group_by_length",
    "dataset_num_proc": "dataset_num_proc",
}

#: TrainingArguments keys with no effect on what is learned that plugtune does not provide
NOTED = {
    "do_train": None, "do_eval": None,
    "do_predict": "use plugtune eval", "overwrite_output_dir": "plugtune never overwrites a run "
    "folder it did not write", "ddp_timeout": "the launcher's default applies",
    "dataloader_num_workers": "data is prepared before training", "log_level": "plugtune -v",
    "logging_strategy": "plugtune logs every logging_steps", "save_only_model": "checkpoints "
    "hold what --resume needs", "hub_strategy": "with hub_model_id the Trainer pushes at every "
    "save", "hub_private_repo": "the repository's own visibility applies",
    "remove_unused_columns": "plugtune's collators pick their columns",
    "gradient_checkpointing_kwargs": None,
    "push_to_hub": None, "hub_model_id": None, "logging_first_step": "always on",
    "save_safetensors": "always safetensors", "run_name": "the run name is the output folder",
    "eval_strategy": None, "evaluation_strategy": None,
    "torch_dtype": None, "dtype": None,  # handled in translate_training
    "bf16": None, "fp16": None, "save_strategy": None, "resume_from_checkpoint": None,
}


def translate_training(d: dict[str, Any], out: dict[str, Any], notices: list[str],
                       errors: list[str]) -> bool | str | None:
    """Copy the ``TrainingArguments`` keys of ``d`` into ``out``; return the resume request.

    Unknown keys are left to the caller. ``bf16``/``fp16``/``torch_dtype`` set ``dtype``;
    ``save_strategy: "no"`` keeps only the final save (noted).
    """
    for k, v in d.items():
        if k in RENAMED and v is not None:
            out[RENAMED[k]] = v
        elif NOTED.get(k) and v not in (None, False):
            notices.append(f"{k}: ignored ({NOTED[k]})")
    if d.get("push_to_hub") and d.get("hub_model_id"):
        out["hub_model_id"] = d["hub_model_id"]  # the Trainer pushes there
    dtype = d.get("torch_dtype") or d.get("dtype")
    if d.get("bf16") is True or dtype in ("bfloat16", "bf16"):
        out["dtype"] = "bf16"
    elif d.get("fp16") is True or dtype in ("float16", "fp16"):
        out["dtype"] = "fp16"
    elif dtype in ("float32", "fp32"):
        out["dtype"] = "fp32"
    elif dtype == "auto":
        out["dtype"] = "auto"
    gck = d.get("gradient_checkpointing_kwargs")
    if gck and gck != {"use_reentrant": False}:
        errors.append(f"  gradient_checkpointing_kwargs: {gck!r}: plugtune checkpoints with "
                      "use_reentrant: false only")
    if d.get("save_strategy") == "no":
        notices.append("save_strategy: no: plugtune saves the finished run only (no checkpoints "
                       "kept beyond save_total_limit)")
    if isinstance(out.get("report_to"), str) and out["report_to"] in ("none", "None"):
        out["report_to"] = "none"
    r = d.get("resume_from_checkpoint")
    if r:
        return True if r is True else str(r)
    return None


def known(key: str) -> bool:
    """Whether ``key`` is a TrainingArguments key this module handles."""
    return key in RENAMED or key in NOTED


#: every field of transformers 5.25.0 ``TrainingArguments`` (a key of these is
#: recognised: one plugtune does not handle is refused, never reported as unknown)
TRAINING_ARGUMENTS = frozenset("""
accelerator_config activation_checkpointing activation_checkpointing_kwargs adam_beta1 adam_beta2
adam_epsilon auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16
bf16_full_eval data_seed dataloader_drop_last dataloader_in_order
dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers
dataloader_pin_memory dataloader_prefetch_factor ddp_backend ddp_broadcast_buffers
ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug deepspeed
disable_tqdm do_eval do_predict do_train enable_jit_checkpoint eval_accumulation_steps eval_delay
eval_do_concat_batches eval_on_start eval_steps eval_strategy eval_use_gather_object fp16
fp16_full_eval fsdp fsdp_config full_determinism gradient_accumulation_steps gradient_checkpointing
gradient_checkpointing_kwargs greater_is_better hub_always_push hub_model_id hub_private_repo
hub_revision hub_strategy hub_token ignore_data_skip include_for_metrics
include_num_input_tokens_seen label_names label_smoothing_factor learning_rate length_column_name
liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica log_on_each_node
logging_first_step logging_nan_inf_filter logging_steps logging_strategy lr_scheduler_kwargs
lr_scheduler_type max_grad_norm max_steps metric_for_best_model neftune_noise_alpha
num_train_epochs optim optim_args optim_target_modules output_dir parallelism_config
per_device_eval_batch_size per_device_train_batch_size prediction_loss_only project push_to_hub
remove_unused_columns report_to restore_callback_states_from_checkpoint resume_from_checkpoint
run_name save_on_each_node save_only_model save_steps save_strategy save_total_limit seed
skip_memory_metrics tf32 torch_compile torch_compile_backend torch_compile_mode
torch_empty_cache_steps trackio_bucket_id trackio_space_id trackio_static_space_id
train_sampling_strategy use_cache use_cpu use_liger_kernel warmup_steps weight_decay
""".split())
