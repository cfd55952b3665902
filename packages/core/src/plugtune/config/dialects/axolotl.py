"""axolotl configs: every key of axolotl's schema honoured, mapped, noted or refused.

Source of the key list: axolotl-ai-cloud/axolotl @ 067b021c, ``src/axolotl/utils/schemas/``
(``AxolotlInputConfig`` and the mixins it inherits: 388 keys) plus two keys its own examples still
carry (``gptq_groupsize``, ``gptq_model_v1``). Each key is in exactly one group of :data:`KEYS`:

- ``honoured``: plugtune has the key with axolotl's meaning (copied as is);
- ``mapped``: translated to other plugtune keys (the text says to what);
- ``noted``: logging, infrastructure or speed knobs with no effect on what is learned that plugtune
  does not provide; a set value is reported once and the run goes on;
- ``refused``: a set value stops with the reason (what plugtune lacks). Unset values (empty,
  ``false``, ``null``, axolotl's default) pass.

``tests/test_config_dialects.py`` checks that every key of the real example configs is in the
table, and README's "Coming from axolotl" table is generated from it (:func:`key_table`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from plugtune.config.dialects.base import Translation, is_unset

NAME = "axolotl"

# -------------------------------------------------------------------------------------------
# the table

_HONOURED = """
base_model trust_remote_code load_in_8bit load_in_4bit lora_r lora_alpha lora_dropout
lora_target_modules lora_target_parameters lora_modules_to_save peft_use_dora peft_use_rslora loraplus_lr_ratio
loraplus_lr_embedding datasets test_datasets val_set_size train_on_inputs sequence_len
sample_packing eval_sample_packing multipack_real_batches group_by_length dataset_num_proc micro_batch_size
eval_batch_size gradient_accumulation_steps learning_rate lr_scheduler warmup_steps warmup_ratio
weight_decay optimizer max_grad_norm num_epochs max_steps gradient_checkpointing seed deepspeed
output_dir logging_steps save_steps save_total_limit eval_steps evals_per_epoch saves_per_epoch
flash_attention attn_implementation chat_template tf32 special_tokens hub_model_id rl
reward_model dpo_beta kto_desirable_weight kto_undesirable_weight orpo_alpha simpo_gamma
cpo_alpha dpo_label_smoothing
"""

_MAPPED = {
    "adapter": "lora / qlora as is; unset means a full fine-tune (adapter: none), as in axolotl",
    "bf16": "dtype: bf16 (true) or auto (auto: bf16 on CUDA with bf16, fp32 elsewhere)",
    "bfloat16": "dtype: bf16",
    "fp16": "dtype: fp16",
    "float16": "dtype: fp16",
    "float32": "dtype: fp32",
    "lora_target_linear": "lora_target_modules: all-linear (every linear layer but the head)",
    "model_type": "a class name (LlamaForCausalLM, AutoModelForCausalLM) is dropped: plugtune "
                  "picks the class from config.json; *ForSequenceClassification -> reward_model",
    "tokenizer_type": "dropped: AutoTokenizer picks the class from the tokenizer's files",
    "processor_type": "dropped: AutoProcessor picks the class from the processor's files",
    "tokenizer_config": "tokenizer",
    "model_revision": "revision",
    "batch_size": "gradient_accumulation_steps = batch_size / micro_batch_size",
    "rl_beta": "dpo_beta (the beta of the preference method)",
    "dpo_loss_type": "dpo_loss_type (one name; axolotl's list of several is refused)",
    "resume_from_checkpoint": "plugtune train --resume (from the run folder's last complete "
                              "checkpoint)",
    "auto_resume_from_checkpoints": "plugtune train --resume when output_dir has a checkpoint",
    "dataset_processes": "dataset_num_proc",
    "gradient_checkpointing_kwargs": "use_reentrant: false is what plugtune always uses; "
                                     "other values refused",
    "eager_attention": "attn_implementation: eager",
    "sdp_attention": "attn_implementation: sdpa",
    "flex_attention": "attn_implementation: flex_attention",
    "xformers_attention": "attn_implementation: sdpa (xformers is axolotl's own patch)",
    "default_system_message": "system_prompt of each dataset that has none",
    "chat_template_jinja": "chat_template (a Jinja string)",
    "use_wandb": "report_to: wandb",
    "use_mlflow": "report_to: mlflow",
    "use_tensorboard": "report_to: tensorboard",
    "use_comet": "report_to: comet_ml",
    "use_trackio": "report_to: trackio",
    "wandb_project": "report_to: wandb + WANDB_PROJECT (transformers' WandbCallback)",
    "wandb_entity": "report_to: wandb + WANDB_ENTITY",
    "wandb_name": "report_to: wandb + WANDB_NAME",
    "wandb_run_id": "report_to: wandb + WANDB_RUN_ID",
    "wandb_mode": "WANDB_MODE",
    "wandb_watch": "WANDB_WATCH",
    "wandb_log_model": "WANDB_LOG_MODEL",
    "mlflow_tracking_uri": "report_to: mlflow + MLFLOW_TRACKING_URI (transformers' MLflowCallback)",
    "mlflow_experiment_name": "report_to: mlflow + MLFLOW_EXPERIMENT_NAME",
    "mlflow_run_name": "report_to: mlflow + MLFLOW_RUN_NAME",
    "hf_mlflow_log_artifacts": "HF_MLFLOW_LOG_ARTIFACTS",
    "comet_project_name": "report_to: comet_ml + COMET_PROJECT_NAME (transformers' CometCallback)",
    "comet_workspace": "report_to: comet_ml + COMET_WORKSPACE",
    "comet_api_key": "COMET_API_KEY",
    "comet_mode": "COMET_MODE",
    "trackio_project_name": "report_to: trackio + TRACKIO_PROJECT",
    "trackio_space_id": "TRACKIO_SPACE_ID",
    "fsdp": "fsdp: a preset: full_shard (+ offload -> full_shard_offload) or shard_grad_op",
    "fsdp_config": "fsdp: the preset its reshard_after_forward / offload_params select",
    "fsdp_version": "plugtune shards with FSDP2 (version 1 refused)",
    "tokens": "added_tokens (added to the vocabulary; an adapter trains their embedding and "
              "output rows)",
}

_NOTED = {
    "dataset_prepared_path": "plugtune prepares data in memory each run (datasets' own cache "
                             "keeps the Arrow files); no prepared copy is written",
    "push_dataset_to_hub": "plugtune does not upload prepared data",
    "skip_prepare_dataset": "plugtune always prepares data (vision rows go through the processor)",
    "remove_unused_columns": "plugtune's collators pick their own columns",
    "pad_to_sequence_len": "rows are padded per batch; the loss is the same",
    "lora_model_dir": "plugtune starts a new adapter (continue a run with plugtune train --resume)",
    "dataloader_num_workers": "plugtune's data is prepared before training",
    "dataloader_pin_memory": "plugtune pins memory on CUDA",
    "dataloader_prefetch_factor": "plugtune's data is prepared before training",
    "dataloader_drop_last": "the last partial batch is kept",
    "loss_watchdog_threshold": "plugtune stops on a non-finite loss, not on a threshold",
    "loss_watchdog_patience": "plugtune stops on a non-finite loss, not on a threshold",
    "early_stopping_patience": "plugtune trains the configured steps/epochs (no early stopping)",
    "qlora_sharded_model_loading": "the 4-bit base loads as one model (no FSDP sharding)",
    "include_tokens_per_second": "plugtune reports real tokens/s in metrics.json",
    "include_tkps": "plugtune reports real tokens/s in metrics.json",
    "strict": "plugtune always validates strictly",
    "torchdistx_path": "torchdistx is not used",
    "gc_steps": "Python's collector runs as usual",
    "gc_collect_steps": "Python's collector runs as usual",
    "torch_empty_cache_steps": "the CUDA cache is left to torch",
    "hub_strategy": "with hub_model_id the Trainer pushes at every save",
    "hub_revision": "pushes go to the repository's main branch",
    "hf_use_auth_token": "the hub token of huggingface_hub's login is used",
    "save_safetensors": "plugtune always saves safetensors",
    "tokenizer_save_jinja_files": "the tokenizer is saved with save_pretrained",
    "tokenizer_use_fast": "AutoTokenizer loads the fast tokenizer",
    "tokenizer_legacy": "the tokenizer's own setting is used",
    "low_cpu_mem_usage": "transformers loads weights lazily already",
    "device_map": "plugtune places the model on the one device (DeepSpeed for more)",
    "max_memory": "plugtune places the model on the one device (DeepSpeed for more)",
    "gpu_memory_limit": "plugtune places the model on the one device (DeepSpeed for more)",
    "device": "the Trainer chooses the device",
    "local_rank": "set by the launcher (accelerate / deepspeed)",
    "world_size": "set by the launcher (accelerate / deepspeed)",
    "ddp_timeout": "the launcher's default applies",
    "ddp_bucket_cap_mb": "the launcher's default applies",
    "ddp_broadcast_buffers": "the launcher's default applies",
    "ddp_find_unused_parameters": "the launcher's default applies",
    "ddp": "set by the launcher (accelerate / deepspeed)",
    "is_preprocess": "plugtune prepare is the preprocessing command",
    "axolotl_config_path": "axolotl's own bookkeeping",
    "is_falcon_derived_model": "plugtune routes by config.json's model_type",
    "is_llama_derived_model": "plugtune routes by config.json's model_type",
    "is_mistral_derived_model": "plugtune routes by config.json's model_type",
    "is_qwen_derived_model": "plugtune routes by config.json's model_type",
    "sample_packing_bin_size": "plugtune's best-fit packing has no bin knob",
    "sample_packing_group_size": "plugtune's best-fit packing has no group knob",
    "sample_packing_eff_est": "plugtune packs the whole dataset once",
    "sample_packing_mp_start_method": "plugtune packs in the main process",
    "sample_packing_sequentially": "plugtune packs best-fit",
    "pretrain_multipack_attn": "packed samples never attend to each other in plugtune",
    "batch_flattening": "plugtune packs with reset position ids",
    "max_packed_sequence_len": "sequence_len bounds packed rows",
    "total_num_tokens": "plugtune counts tokens itself",
    "total_supervised_tokens": "plugtune counts tokens itself",
    "eval_table_size": "no sample table is logged",
    "eval_max_new_tokens": "plugtune's generation: max_new_tokens sets this",
    "do_causal_lm_eval": "plugtune's eval_metrics sets the evaluations",
    "eval_causal_lm_metrics": "plugtune's eval_metrics sets the evaluations",
    "profiler_steps": "no profiler trace is written",
    "profiler_steps_start": "no profiler trace is written",
    "otel_metrics_host": "OpenTelemetry export is not wired",
    "otel_metrics_port": "OpenTelemetry export is not wired",
    "use_otel_metrics": "OpenTelemetry export is not wired",
    "comet_online": "set COMET_MODE instead",
    "comet_experiment_key": "set by comet_ml itself",
    "comet_experiment_config": "comet_ml's defaults apply",
    "trackio_run_name": "the run name is the output folder",
    "gradio_title": "no Gradio app", "gradio_share": "no Gradio app",
    "gradio_server_name": "no Gradio app", "gradio_server_port": "no Gradio app",
    "gradio_max_new_tokens": "no Gradio app", "gradio_temperature": "no Gradio app",
    "num_dataset_shards_to_save": "no prepared copy is written",
    "shuffle_merged_datasets": "plugtune shuffles the training rows every epoch (Trainer sampler)",
    "shuffle_before_merging_datasets": "plugtune shuffles the training rows every epoch",
    "dataset_keep_in_memory": "datasets decides what stays in memory",
    "save_only_model": "checkpoints hold what --resume needs",
    "generate_samples": "generation runs after training (eval_metrics: exact_match / rouge)",
    "num_generation_samples": "generation runs after training (eval_metrics)",
    "generation_max_new_tokens": "set generation.max_new_tokens",
    "generation_temperature": "set generation.temperature",
    "generation_top_p": "set generation.top_p",
    "generation_top_k": "plugtune's generation has no top_k",
    "generation_do_sample": "set generation.do_sample",
    "generation_prompt_ratio": "generation uses the held-out prompts",
    "experimental_skip_move_to_device": "transformers places the weights",
    "gptq_groupsize": "an obsolete key still in axolotl's falcon examples (no effect there)",
    "gptq_model_v1": "an obsolete key still in axolotl's falcon examples (no effect there)",
    "auto_find_batch_size": "micro_batch_size is used as given",
    "image_resize_algorithm": "the processor's own resize is used",
    "processor_kwargs": "the processor's saved settings are used",
    "mean_resizing_embeddings": "new embedding rows start as transformers initialises them",
    "embeddings_skip_upcast": "embeddings keep the model's dtype",
    "fsdp_final_state_dict_type": "rank 0 saves the full adapter / model",
}

_REFUSED_GROUPS = {
    "plugtune has no GPTQ/torchao/QAT/FP8 training path (bitsandbytes 4/8-bit only: "
    "load_in_4bit, load_in_8bit)": """gptq quantization qat fp8 fp8_enable_fsdp_float8_all_gather
        model_quantization_config model_quantization_config_kwargs bnb_config_kwargs
        quantize_moe_experts use_onebitllms""",
    "plugtune has no ReLoRA / LISA / Q-GaLore / Dion / jagged restarts (peft LoRA, DoRA, "
    "rsLoRA, LoRA+ only)": """relora relora_cpu_offload relora_prune_method relora_prune_ratio
        lisa_n_layers lisa_step_interval lisa_layers_attribute qgalore_rank
        qgalore_update_proj_gap qgalore_scale qgalore_proj_type qgalore_proj_quant
        qgalore_proj_bits qgalore_proj_group_size qgalore_cos_threshold qgalore_gamma_proj
        qgalore_queue_size dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of
        jagged_restart_steps jagged_restart_warmup_steps jagged_restart_anneal_steps""",
    "plugtune has no tensor, context or sequence parallelism (DeepSpeed ZeRO or FSDP2 "
    "sharding only)": """tensor_parallel_size context_parallel_size sequence_parallel_degree heads_k_stride
        ring_attn_func dp_shard_size dp_replicate_size deepcompile use_ray ray_num_workers
        ray_run_name resources_per_worker accelerator_config""",
    "plugtune has none of axolotl's kernel patches (Liger, fused/tiled MLP, chunked or flash "
    "cross-entropy, custom LoRA kernels)": """lora_mlp_kernel lora_qkv_kernel lora_o_kernel
        lora_embedding_kernel flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_mlp
        flash_attn_d512 flash_optimum fused_attn_kernel chunked_cross_entropy
        chunked_cross_entropy_num_chunks tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp
        use_kernels experts_implementation llama4_linearized_experts large_head_attention
        sage_attention s2_attention scaling_softmax scaling_softmax_factor scaling_softmax_bias
        sdpa_varlen gemma4_hybrid_attn_impl flex_attn_compile_kwargs dpo_use_liger_kernel
        dpo_use_logits_to_keep dpo_padding_free eaft_alpha eaft_k use_eaft""",
    "plugtune has no torch.compile, activation offloading or selective checkpointing switch":
        """torch_compile torch_compile_backend torch_compile_mode torch_compile_options
        activation_offloading layer_offloading selective_checkpointing dynamic_checkpoint
        fp32_norms fp32_norm_classes""",
    "plugtune trains from a map-style dataset; no streaming / pretraining-dataset / sharded "
    "loading": """streaming streaming_multipack_buffer_size pretraining_dataset
        pretraining_sample_concatenation pretrain_multipack_buffer_size preprocess_iterable
        dataset_shard_num dataset_shard_idx curriculum_sampling dataset_exact_deduplication""",
    "plugtune has no RoPE/context extension training (PoSE) or rope overrides": """use_pose
        pose_split_on_token_ids pose_max_context_len pose_num_chunks rope_scaling""",
    "plugtune has no GRPO/online RL, process reward models, vLLM or knowledge distillation":
        """trl vllm process_reward_model ebft dpo_generate_during_eval precompute_ref_log_probs
        center_rewards_coefficient rpo_alpha dpo_use_weighting dpo_norm_loss dpo_loss_weights""",
    "plugtune has no per-module learning rates or optimizer extras (LoRA+ aside)": """lr_groups
        embedding_lr embedding_lr_scale optim_args optim_target_modules lr_scheduler_kwargs
        lr_quadratic_warmup lr_div_factor cosine_min_lr_ratio cosine_constant_lr_ratio
        adam_beta1 adam_beta2 adam_beta3 adam_epsilon adam_epsilon2 neftune_noise_alpha
        noisy_embedding_alpha""",
    "plugtune has no axolotl plugin system (its plugins are pluggy packages) nor custom "
    "trainer classes": """plugins trainer_cls""",
    "plugtune has no partial freezing, layer replication or weight re-initialisation":
        """unfrozen_parameters freeze_mm_modules peft_layers_to_transform peft_layers_pattern
        peft_layer_replication reinit_weights shrink_embeddings resize_token_embeddings_to_32x
        peft_trainable_token_indices lora_fan_in_fan_out lora_rank_pattern
        lora_alpha_pattern peft_init_lora_weights peft lora_on_cpu peft_autocast_adapter_dtype
        peft_ensure_weight_tying fix_untrained_tokens""",
    "plugtune has no merge/inference mode in train (use plugtune merge / generate)":
        """merge_lora merge_method""",
    "plugtune has no eval/save strategy or best-model switches beyond steps/epochs":
        """eval_strategy evaluation_strategy save_strategy save_first_step load_best_model_at_end
        metric_for_best_model greater_is_better bench_dataset bench_split do_bench_eval
        eval_sequence_len""",
    "plugtune has no min/max sample length filter or excess-length strategy beyond truncation":
        """min_sample_len max_prompt_len excess_length_strategy pad_to_multiple_of""",
    "plugtune builds the model and tokenizer from config.json / tokenizer files only":
        """base_model_config cls_model_config model_config model_kwargs tokenizer_use_mistral_common
        added_tokens_overrides chat_template_kwargs eot_tokens role_boundaries image_size
        num_labels""",
}


def _words(text: str) -> list[str]:
    return text.split()


def _build() -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for k in _words(_HONOURED):
        table[k] = ("honoured", "same key, same meaning")
    for k, v in _MAPPED.items():
        table[k] = ("mapped", v)
    for k, v in _NOTED.items():
        table[k] = ("noted", v)
    for reason, keys in _REFUSED_GROUPS.items():
        for k in _words(keys):
            table[k] = ("refused", reason)
    return table


#: key -> (group, text): group is honoured | mapped | noted | refused
KEYS: dict[str, tuple[str, str]] = _build()

#: axolotl's defaults for refused keys that have one: setting a key to its default is harmless
_DEFAULTS: dict[str, Any] = {
    "lisa_layers_attribute": "model.layers", "dion_rank_fraction": 1.0, "dion_rank_multiple_of": 1,
    "qgalore_rank": 256, "qgalore_update_proj_gap": 200, "qgalore_scale": 0.25,
    "qgalore_proj_type": "std", "qgalore_proj_quant": True, "qgalore_proj_bits": 4,
    "qgalore_proj_group_size": 256, "qgalore_cos_threshold": 0.4, "qgalore_gamma_proj": 2,
    "qgalore_queue_size": 5, "relora_prune_method": "magnitude", "merge_method": "memory_efficient",
    "tiled_mlp_use_original_mlp": True, "eaft_alpha": 1.0, "eaft_k": 20, "ray_num_workers": 1,
    "pretrain_multipack_attn": True, "streaming_multipack_buffer_size": 10000, "num_labels": 1,
}

#: axolotl's own defaults where plugtune's differ (applied when the key is absent)
AXOLOTL_DEFAULTS: dict[str, Any] = {
    "micro_batch_size": 1, "lora_dropout": 0.0, "output_dir": "./model-out",
    "group_by_length": False, "sequence_len": 512,
}

_CLASS_NAME = re.compile(r"^(Auto)?[A-Z]\w*For[A-Z]\w+$")
_ENV = {
    "wandb_project": ("WANDB_PROJECT", "wandb"), "wandb_entity": ("WANDB_ENTITY", "wandb"),
    "wandb_name": ("WANDB_NAME", "wandb"), "wandb_run_id": ("WANDB_RUN_ID", "wandb"),
    "wandb_mode": ("WANDB_MODE", None), "wandb_watch": ("WANDB_WATCH", None),
    "wandb_log_model": ("WANDB_LOG_MODEL", None),
    "mlflow_tracking_uri": ("MLFLOW_TRACKING_URI", "mlflow"),
    "mlflow_experiment_name": ("MLFLOW_EXPERIMENT_NAME", "mlflow"),
    "mlflow_run_name": ("MLFLOW_RUN_NAME", "mlflow"),
    "hf_mlflow_log_artifacts": ("HF_MLFLOW_LOG_ARTIFACTS", None),
    "comet_project_name": ("COMET_PROJECT_NAME", "comet_ml"),
    "comet_workspace": ("COMET_WORKSPACE", "comet_ml"), "comet_api_key": ("COMET_API_KEY", None),
    "comet_mode": ("COMET_MODE", None),
    "trackio_project_name": ("TRACKIO_PROJECT", "trackio"),
    "trackio_space_id": ("TRACKIO_SPACE_ID", None),
}
_REPORT = {"use_wandb": "wandb", "use_mlflow": "mlflow", "use_tensorboard": "tensorboard",
           "use_comet": "comet_ml", "use_trackio": "trackio"}
_ATTN = {"eager_attention": "eager", "sdp_attention": "sdpa", "flex_attention": "flex_attention",
         "xformers_attention": "sdpa"}
#: axolotl attention names that are axolotl's own patches, not transformers implementations
_ATTN_PATCHES = {"xformers", "sage", "s2", "flash_attention_3"}


def key_group(key: str) -> tuple[str, str] | None:
    """``(group, text)`` of an axolotl key, ``None`` when axolotl has no such key."""
    return KEYS.get(key)


def detect(data: dict[str, Any]) -> bool:
    """An axolotl config: some key is axolotl's and not plugtune's."""
    from plugtune.config.schema import Recipe

    return any(k not in Recipe.model_fields and k in KEYS for k in data)


def _is_off(key: str, value: Any) -> bool:
    if is_unset(value) or value is False:
        return True
    return key in _DEFAULTS and value == _DEFAULTS[key]


def translate(data: dict[str, Any], source: str = "<recipe>") -> Translation:
    """Translate an axolotl config (or a plugtune recipe, returned unchanged) into recipe keys.

    Keys neither plugtune's nor axolotl's are left in place, so validation reports them as
    unknown (with a "did you mean" for a plausible typo).

    Raises:
        plugtune.config.RecipeError: a refused key set to a value plugtune cannot honour.
    """
    from plugtune.config.schema import Recipe, RecipeError

    if not detect(data):
        return Translation(data=dict(data), dialect="plugtune")
    data = _liger(data)
    out: dict[str, Any] = {}
    notices: list[str] = []
    errors: list[str] = []
    env: dict[str, str] = {}
    report: list[str] = []
    resume: bool | str | None = None
    d = {k: v for k, v in data.items() if not is_unset(v)}  # empty values mean unset

    for key, value in d.items():
        group = KEYS.get(key)
        if group is None:  # plugtune-only or unknown: validation decides
            out[key] = value
            continue
        kind, text = group
        if kind == "honoured":
            out[key] = value
        elif kind == "noted":
            if not _is_off(key, value):
                notices.append(f"{key}: ignored ({text})")
        elif kind == "refused":
            if not _is_off(key, value):
                errors.append(f"  {key}: {value!r} is axolotl's, but {text}")
        elif key in _ENV:
            var, rep = _ENV[key]
            env[var] = str(value).lower() if isinstance(value, bool) else str(value)
            if rep:
                report.append(rep)
        elif key in _REPORT:
            if value:
                report.append(_REPORT[key])
        elif key in _ATTN:
            if value:
                out.setdefault("attn_implementation", _ATTN[key])
        # the remaining mapped keys are handled below, where they depend on other keys

    # precision
    if d.get("bf16") == "auto":
        out["dtype"] = "auto"
    elif d.get("bf16") is True or d.get("bfloat16") is True:
        out["dtype"] = "bf16"
    elif d.get("fp16") is True or d.get("float16") is True:
        out["dtype"] = "fp16"
    elif d.get("float32") is True:
        out["dtype"] = "fp32"
    # adapter: unset is a full fine-tune in axolotl
    adapter = d.get("adapter")
    if adapter is None:
        out["adapter"] = "none"
    elif adapter in ("lora", "qlora"):
        out["adapter"] = adapter
    else:
        errors.append(f"  adapter: {adapter!r} is axolotl's, but plugtune has LoRA and QLoRA only")
    if d.get("lora_target_linear") and out.get("adapter") != "none":
        if d.get("lora_target_modules"):
            notices.append("lora_target_linear: all-linear replaces lora_target_modules (a subset)")
        out["lora_target_modules"] = "all-linear"
    mt = d.get("model_type")
    if isinstance(mt, str) and _CLASS_NAME.match(mt):
        out.pop("model_type", None)
        if mt.endswith("ForSequenceClassification"):
            out["reward_model"] = True
    elif mt is not None:
        out["model_type"] = mt
    if d.get("tokens"):
        out["added_tokens"] = list(d["tokens"])
    if "tokenizer_config" in d:
        out["tokenizer"] = d["tokenizer_config"]
    if "model_revision" in d:
        out["revision"] = d["model_revision"]
    if "batch_size" in d and "gradient_accumulation_steps" not in d:
        mbs = d.get("micro_batch_size", AXOLOTL_DEFAULTS["micro_batch_size"])
        out["gradient_accumulation_steps"] = max(1, int(d["batch_size"]) // int(mbs))
    if "rl_beta" in d:
        out.setdefault("dpo_beta", d["rl_beta"])
    if "dpo_loss_type" in d:
        lt = d["dpo_loss_type"]
        if isinstance(lt, list):
            if len(lt) > 1:
                errors.append(f"  dpo_loss_type: {lt!r}: plugtune trains one loss type at a time")
            else:
                out["dpo_loss_type"] = lt[0]
    if "dataset_processes" in d:
        out.setdefault("dataset_num_proc", d["dataset_processes"])
    gck = d.get("gradient_checkpointing_kwargs")
    if gck is not None and gck != {"use_reentrant": False}:
        errors.append(f"  gradient_checkpointing_kwargs: {gck!r}: plugtune checkpoints with "
                      "use_reentrant: false only")
    if "chat_template_jinja" in d:
        out["chat_template"] = d["chat_template_jinja"]
    if d.get("default_system_message") and isinstance(out.get("datasets"), list):
        out["datasets"] = [dict(ds, system_prompt=ds.get("system_prompt") or d["default_system_message"])
                           if isinstance(ds, dict) else ds for ds in out["datasets"]]
    attn = out.get("attn_implementation")
    if attn in _ATTN_PATCHES:
        notices.append(f"attn_implementation: {attn} is an axolotl patch; using sdpa")
        out["attn_implementation"] = "sdpa"
    if xf := d.get("xformers_attention"):
        if xf:
            notices.append("xformers_attention: using sdpa (xformers is an axolotl patch)")
    _fsdp(d, out, notices, errors)
    if (r := d.get("resume_from_checkpoint")) is not None:
        resume = str(r)
    elif d.get("auto_resume_from_checkpoints"):
        out_dir = Path(str(d.get("output_dir", AXOLOTL_DEFAULTS["output_dir"])))
        if any(out_dir.glob("checkpoint-*")):
            resume = True
    ds_types = [ds.get("type") for ds in out.get("datasets") or [] if isinstance(ds, dict)]
    if ds_types and "chat_template" not in out and all(t == "alpaca" for t in ds_types):
        # axolotl renders type: alpaca with its Stanford Alpaca prompt whatever the tokenizer's
        # chat template (prompters.AlpacaPrompter); plugtune's named template is that prompt
        out["chat_template"] = "alpaca"
        notices.append("datasets: type alpaca: chat_template: alpaca (axolotl's Alpaca prompt, "
                       "not the tokenizer's chat template; set chat_template to change it)")
    if report:
        have = out.get("report_to", "none")
        have_l = [have] if isinstance(have, str) else list(have)
        out["report_to"] = [x for x in dict.fromkeys(have_l + report) if x != "none"]
    if env:
        out["report_env"] = env
    for k, v in AXOLOTL_DEFAULTS.items():
        if k in Recipe.model_fields:
            out.setdefault(k, v)
    if errors:
        raise RecipeError(f"axolotl config {source}: keys plugtune recognises but cannot honour:\n"
                          + "\n".join(errors))
    return Translation(data=out, dialect=NAME, notices=notices, resume=resume,
                       foreign_keys=frozenset(KEYS))


def _fsdp(d: dict[str, Any], out: dict[str, Any], notices: list[str], errors: list[str]) -> None:
    """axolotl's ``fsdp`` (list of options) / ``fsdp_config`` / ``fsdp_version`` -> plugtune's
    ``fsdp`` preset (:data:`plugtune.scale.FSDP_PRESETS`)."""
    if not (d.get("fsdp") or d.get("fsdp_config")):
        return
    if d.get("fsdp_version") not in (None, 2, "2"):
        errors.append(f"  fsdp_version: {d['fsdp_version']!r}: plugtune shards with FSDP2 only")
        return
    opts = d.get("fsdp") or []
    opts = opts.split() if isinstance(opts, str) else [str(o) for o in opts]
    cfg = d.get("fsdp_config") or {}
    cfg = {str(k).removeprefix("fsdp_"): v for k, v in cfg.items()} if isinstance(cfg, dict) else {}
    offload = "offload" in opts or bool(cfg.get("offload_params"))
    if "shard_grad_op" in opts or cfg.get("reshard_after_forward") is False:
        preset = "shard_grad_op"
    else:
        preset = "full_shard_offload" if offload else "full_shard"
    out["fsdp"] = preset
    rest = sorted(set(cfg) - {"offload_params", "reshard_after_forward", "version"})
    if rest:
        notices.append(f"fsdp_config: {', '.join(rest)}: plugtune's {preset} preset decides these")


def _liger(data: dict[str, Any]) -> dict[str, Any]:
    """axolotl's Liger plugin keys (``plugins: [axolotl.integrations.liger.LigerPlugin]``,
    ``liger_*``) -> plugtune's ``liger_kernel`` keys, by :func:`plugtune.kernels.axolotl_to_plugtune`
    where this plugtune has it; the ``plugins`` entries left over are refused below."""
    if not (data.get("plugins") or any(str(k).startswith("liger_") for k in data)):
        return data
    try:
        from plugtune.kernels import axolotl_to_plugtune
    except ImportError:
        return data
    return axolotl_to_plugtune(dict(data))


def key_table() -> dict[str, list[tuple[str, str]]]:
    """Every axolotl key by group: ``{group: [(key, text), ...]}`` sorted by key (for README)."""
    groups: dict[str, list[tuple[str, str]]] = {"honoured": [], "mapped": [], "noted": [],
                                               "refused": []}
    for k in sorted(KEYS):
        kind, text = KEYS[k]
        groups[kind].append((k, text))
    return groups
