"""Scale-out helpers: DeepSpeed ZeRO and FSDP2 presets, and gathering sharded weights for saving.

A recipe's ``deepspeed:`` key is a preset name (``zero2``, ``zero3``, ``zero3_offload``) or the
path of a DeepSpeed JSON config. Presets ship in ``plugtune/recipes/deepspeed/`` in the style of
the Hugging Face DeepSpeed integration: ``"auto"`` values are filled by ``transformers`` from the
recipe (batch size, accumulation, clipping, bf16/fp16), so the recipe stays the one source of
truth. The presets set no ``optimizer``/``scheduler`` section: the recipe's ``optimizer`` and
``lr_scheduler`` are used (with ZeRO-Offload, accelerate swaps a torch AdamW for DeepSpeed's
``DeepSpeedCPUAdam``). Under ZeRO-3 each rank holds a shard of every parameter, so saving needs
the gathered weights (``stage3_gather_16bit_weights_on_model_save: true`` in the presets);
:func:`gathered_state_dict` returns them.

Launching on N GPUs (one process per GPU; accelerate or the deepspeed launcher)::

    accelerate launch --num_processes N -m plugtune train RECIPE
    deepspeed --num_gpus N --module plugtune train RECIPE

Source for the preset values: transformers docs, "DeepSpeed" (ZeRO-2 / ZeRO-3 config examples),
and DeepSpeed's config reference (https://www.deepspeed.ai/docs/config-json/).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from plugtune.config import RecipeError

PRESETS = ("zero2", "zero3", "zero3_offload")

#: keys of ``zero_optimization`` that DeepSpeed 0.19 knows (``DeepSpeedZeroConfig``)
ZERO_KEYS = {
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
    "use_multi_rank_bucket_allreduce", "allgather_partitions", "allgather_bucket_size",
    "overlap_comm", "compute_grad_norm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "zenflow", "sub_group_size", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "cpu_offload", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save", "stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential",
    "stage3_gather_fp16_weights_on_model_save", "ignore_unused_parameters", "legacy_stage1",
    "round_robin_gradients", "zero_hpz_partition_size", "zero_quantized_weights",
    "zero_quantized_nontrainable_weights", "zero_quantized_gradients", "memory_efficient_linear",
    "pipeline_loading_checkpoint", "override_module_apply", "log_trace_cache_warnings",
    "enable_sanity_checks", "save_muon_momentum_buffer_in_memory", "leaf_module", "mics_shard_size",
    "mics_hierarchical_params_gather",
}
#: ``zero_optimization`` keys the HF integration may fill from the model ("auto")
ZERO_AUTO_KEYS = {"reduce_bucket_size", "stage3_prefetch_bucket_size",
                  "stage3_param_persistence_threshold"}
#: top-level keys the HF integration fills from ``TrainingArguments`` ("auto")
TOP_AUTO_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu",
                 "gradient_accumulation_steps", "gradient_clipping"}
OFFLOAD_KEYS = {"device", "nvme_path", "pin_memory", "buffer_count", "buffer_size",
                "max_in_cpu", "pipeline_read", "pipeline_write", "fast_init", "ratio"}


class DeepSpeedConfigError(RecipeError):
    """A DeepSpeed config (preset or file) is invalid; the message names the file and key."""


def presets_dir() -> Path:
    """Folder of the bundled preset JSON files."""
    return Path(__file__).parent / "recipes" / "deepspeed"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_deepspeed_config(cfg: Any, source: str = "<deepspeed config>") -> dict:
    """Check the parts of a DeepSpeed config that plugtune relies on.

    Checks: a JSON object; ``zero_optimization`` a mapping with ``stage`` in 0..3 and only known
    keys (typos get a "did you mean"); offload devices ``cpu``/``nvme``/``none`` (``nvme`` needs
    ``nvme_path``; parameter offload only with stage 3); batch-size / accumulation / clipping
    keys numbers or ``"auto"``; ``bf16`` and ``fp16`` not both enabled.

    Returns:
        ``cfg`` unchanged.

    Raises:
        DeepSpeedConfigError: naming ``source`` and the key path.
    """
    def bad(key: str, why: str) -> DeepSpeedConfigError:
        return DeepSpeedConfigError(f"deepspeed config {source}: {key}: {why}")

    if not isinstance(cfg, dict):
        raise bad("<root>", f"expected a JSON object, got {type(cfg).__name__}")
    for key in TOP_AUTO_KEYS:
        if key in cfg and not (_is_number(cfg[key]) or cfg[key] == "auto"):
            raise bad(key, f"expected a number or \"auto\", got {cfg[key]!r}")
    enabled = {}
    for prec in ("bf16", "fp16"):
        sec = cfg.get(prec)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise bad(prec, f"expected an object like {{\"enabled\": \"auto\"}}, got {sec!r}")
        val = sec.get("enabled", False)
        if val not in (True, False, "auto"):
            raise bad(f"{prec}.enabled", f"expected true, false or \"auto\", got {val!r}")
        enabled[prec] = val
    if enabled.get("bf16") is True and enabled.get("fp16") is True:
        raise bad("bf16/fp16", "both enabled; choose one (bf16 on GPUs that support it)")
    zero = cfg.get("zero_optimization")
    if zero is None:
        return cfg
    if not isinstance(zero, dict):
        raise bad("zero_optimization", f"expected an object, got {type(zero).__name__}")
    for key in zero:
        if key not in ZERO_KEYS:
            close = difflib.get_close_matches(key, sorted(ZERO_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise bad(f"zero_optimization.{key}", f"unknown key{hint}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise bad("zero_optimization.stage", f"expected 0, 1, 2 or 3, got {stage!r}")
    for key, value in zero.items():
        if key in ZERO_AUTO_KEYS and value == "auto":
            continue
        if key.endswith(("_size", "_threshold", "_parameters", "_distance")) and not _is_number(value):
            raise bad(f"zero_optimization.{key}", f"expected a number, got {value!r}")
    for off in ("offload_optimizer", "offload_param"):
        sec = zero.get(off)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise bad(f"zero_optimization.{off}", f"expected an object, got {sec!r}")
        for key in sec:
            if key not in OFFLOAD_KEYS:
                raise bad(f"zero_optimization.{off}.{key}",
                          f"unknown key; expected one of {', '.join(sorted(OFFLOAD_KEYS))}")
        device = sec.get("device", "none")
        if device not in ("cpu", "nvme", "none"):
            raise bad(f"zero_optimization.{off}.device",
                      f"expected \"cpu\", \"nvme\" or \"none\", got {device!r}")
        if device == "nvme" and not sec.get("nvme_path"):
            raise bad(f"zero_optimization.{off}.nvme_path", "required when device is \"nvme\"")
        if off == "offload_param" and device != "none" and stage != 3:
            raise bad(f"zero_optimization.{off}", f"parameter offload needs stage 3, not {stage}")
    return cfg


def deepspeed_config(value: str | dict) -> dict:
    """Resolve the recipe's ``deepspeed:`` value to a validated config dict.

    Args:
        value: a preset name (:data:`PRESETS`), the path of a JSON file, or a dict.

    Returns:
        The config as a dict (``TrainingArguments(deepspeed=...)`` accepts it); ``"auto"``
        values are left for ``transformers`` to fill from the recipe.

    Raises:
        DeepSpeedConfigError: unknown preset / missing file (lists the presets), malformed JSON
            (file and line), or an invalid key (see :func:`validate_deepspeed_config`).
    """
    if isinstance(value, dict):
        return validate_deepspeed_config(value, "<dict>")
    if value in PRESETS:
        path = presets_dir() / f"{value}.json"
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            close = difflib.get_close_matches(value, PRESETS, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DeepSpeedConfigError(
                f"deepspeed: {value!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                f"JSON file{hint}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(
            f"deepspeed config {path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    return validate_deepspeed_config(cfg, str(path))


def zero_stage(value: str | dict | None) -> int:
    """The ZeRO stage of a recipe's ``deepspeed:`` value (0 when DeepSpeed is off)."""
    if not value:
        return 0
    return int(deepspeed_config(value).get("zero_optimization", {}).get("stage", 0))


def gathered_state_dict(trainer) -> dict | None:
    """The full state dict of ``trainer``'s model when its parameters are sharded, else ``None``.

    Under DeepSpeed ZeRO-3 every rank holds only a shard of each parameter (the local tensors
    are empty placeholders), so ``model.save_pretrained()`` would write empty adapter weights.
    This gathers them with ``accelerator.get_state_dict`` (DeepSpeed's
    ``_zero3_consolidated_16bit_state_dict``, which needs
    ``stage3_gather_16bit_weights_on_model_save: true``, set in the presets). For a PEFT model,
    ``PeftModel.save_pretrained(state_dict=...)`` picks the adapter keys out of it.

    Under FSDP (``fsdp:``) the same call gathers the full state dict on every rank (a
    collective: every rank must call it).

    Returns ``None`` without DeepSpeed or FSDP, or below ZeRO stage 3 (the live parameters
    are complete).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model)
        return {k: v.detach().cpu() for k, v in state.items()} if state else None
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    ds_cfg = trainer.accelerator.deepspeed_config or {}
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    engine = getattr(trainer, "model_wrapped", None) or trainer.deepspeed
    state = trainer.accelerator.get_state_dict(engine)
    return {k: v.detach().cpu() for k, v in state.items()} if state is not None else None


def deepspeed_available() -> bool:
    """True when ``deepspeed`` imports (``pip install 'plugtune[deepspeed]'``)."""
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA toolchain probe
        return False
    return True


def ensure_distributed_env() -> None:
    """Make a launcher-less process rank 0 of a world of 1 (DeepSpeed needs a process group).

    ``accelerate launch`` / ``deepspeed`` / ``torchrun`` set ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them DeepSpeed falls back to MPI
    discovery (and fails without mpi4py). When none is set, this sets the single-process values
    with a free local port; when a launcher set any of them, nothing is changed.
    """
    import os
    import socket

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if any(k in os.environ for k in keys):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def ensure_cpu_process_group() -> bool:
    """On a machine without CUDA, make a multi-process launch (``accelerate launch
    --multi_gpu --num_processes N`` / ``torchrun --nproc_per_node N``) a real DDP run over gloo.

    Without ``ACCELERATE_USE_CPU`` accelerate's state does not join the launcher's process group
    on CPU: every rank then trains alone on the whole data (N copies of a one-process run, each
    seeing every batch), silently. When the launcher's ``WORLD_SIZE`` is above 1 and no CUDA device
    is visible, this sets ``ACCELERATE_USE_CPU=true`` before ``TrainingArguments`` exist.

    Returns:
        ``True`` when it set the variable.
    """
    import os

    import torch

    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            and "ACCELERATE_USE_CPU" not in os.environ):
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return True
    return False


# ---------------------------------------------------------------------------------------------
# FSDP (FSDP2, torch.distributed.fsdp.fully_shard, through accelerate)

#: ``fsdp:`` presets -> ``TrainingArguments.fsdp_config`` (FSDP2; ``auto_wrap_policy``
#: TRANSFORMER_BASED_WRAP falls back to the model's ``_no_split_modules``, i.e. one FSDP unit per
#: decoder layer). ``full_shard`` ~ ZeRO-3 (parameters resharded after each forward),
#: ``shard_grad_op`` ~ ZeRO-2 (kept gathered from forward to backward: more memory, fewer
#: all-gathers), ``full_shard_offload`` also keeps parameters and gradients in CPU memory.
#: Source: transformers ``TrainingArguments.fsdp_config`` docs (5.x), accelerate
#: ``FullyShardedDataParallelPlugin``.
FSDP_PRESETS: dict[str, dict] = {
    "full_shard": {"version": 2, "reshard_after_forward": True},
    "shard_grad_op": {"version": 2, "reshard_after_forward": False},
    "full_shard_offload": {"version": 2, "reshard_after_forward": True, "cpu_offload": True},
}
#: keys of ``fsdp_config`` that transformers 5 reads (an ``fsdp_`` prefix is accepted too)
FSDP_KEYS = {"version", "reshard_after_forward", "cpu_offload", "activation_checkpointing",
             "cpu_ram_efficient_loading", "state_dict_type", "auto_wrap_policy",
             "transformer_layer_cls_to_wrap", "min_num_params", "forward_prefetch",
             "backward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers"}


class FSDPConfigError(RecipeError):
    """An ``fsdp:`` value (preset or file) is invalid; the message names the file and key."""


def validate_fsdp_config(cfg: Any, source: str = "<fsdp config>") -> dict:
    """Check an FSDP config mapping: known keys (typos get a "did you mean"), ``version`` 1 or
    2, booleans where transformers expects them, a valid ``state_dict_type`` and wrap policy.

    Returns:
        A copy without ``fsdp_`` prefixes.

    Raises:
        FSDPConfigError: naming ``source`` and the key.
    """
    def bad(key: str, why: str) -> FSDPConfigError:
        return FSDPConfigError(f"fsdp config {source}: {key}: {why}")

    if not isinstance(cfg, dict):
        raise bad("<root>", f"expected a JSON object, got {type(cfg).__name__}")
    out = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in cfg.items()}
    for key in out:
        if key not in FSDP_KEYS:
            close = difflib.get_close_matches(key, sorted(FSDP_KEYS), n=1, cutoff=0.6)
            raise bad(key, "unknown key" + (f"; did you mean '{close[0]}'?" if close else ""))
    if out.get("version", 2) not in (1, 2):
        raise bad("version", f"expected 2 (FSDP2) or 1, got {out['version']!r}")
    for key in ("cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading"):
        if key in out and not isinstance(out[key], bool):
            raise bad(key, f"expected true or false, got {out[key]!r}")
    if out.get("version", 2) == 2 and not isinstance(out.get("reshard_after_forward", True), bool):
        raise bad("reshard_after_forward", "FSDP2 takes true (full_shard) or false (shard_grad_op)")
    sdt = out.get("state_dict_type", "FULL_STATE_DICT")
    if sdt not in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
        raise bad("state_dict_type", f"expected FULL_STATE_DICT or SHARDED_STATE_DICT, got {sdt!r}")
    pol = out.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    if pol not in ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"):
        raise bad("auto_wrap_policy", "expected TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP, "
                  f"got {pol!r}")
    return out


def fsdp_config(value: str | dict, gradient_checkpointing: bool = False) -> dict:
    """Resolve the recipe's ``fsdp:`` value (a :data:`FSDP_PRESETS` name, a JSON file or a
    dict) to a validated ``TrainingArguments.fsdp_config``.

    ``gradient_checkpointing: true`` becomes FSDP's own ``activation_checkpointing`` (the
    model-level switch costs a redundant all-gather in the backward under FSDP).

    Raises:
        FSDPConfigError: unknown preset / missing file (lists the presets), malformed JSON
            (file and line), or an invalid key (see :func:`validate_fsdp_config`).
    """
    if isinstance(value, dict):
        cfg = validate_fsdp_config(value, "<dict>")
    elif value in FSDP_PRESETS:
        cfg = dict(FSDP_PRESETS[value])
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            close = difflib.get_close_matches(value, list(FSDP_PRESETS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FSDPConfigError(f"fsdp: {value!r} is neither a preset ({', '.join(FSDP_PRESETS)}) "
                                  f"nor an existing JSON file{hint}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FSDPConfigError(f"fsdp config {path}:{exc.lineno}: malformed JSON ({exc.msg} at "
                                  f"column {exc.colno})") from None
        cfg = validate_fsdp_config(raw, str(path))
    if gradient_checkpointing:
        cfg.setdefault("activation_checkpointing", True)
    return cfg

