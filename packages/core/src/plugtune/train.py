"""Build and run one training run from a recipe.

recipe -> plugin manager -> family route -> ``plugtune_load`` -> data pipeline -> training
method (``rl:``; a ``plugtune_methods`` plugin, core's own in :mod:`plugtune.methods`) -> its
Trainer -> run directory.

The run directory holds the adapter (or full weights) in standard PEFT / transformers format,
the tokenizer, ``recipe.yaml``, ``metrics.json``, ``training.png`` and a model card ``README.md``.
Checkpoints are marked complete only after they are fully written, so ``--resume`` never picks
a half-written one.

This module imports no method: it dispatches by name through the plugin manager. The shared
pieces live in :mod:`plugtune.trainer` and :mod:`plugtune.rundir` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import transformers

from plugtune import moe
from plugtune.config import Recipe
from plugtune.data import prepare
from plugtune.kbit import cpu_4bit_fallback, cpu_4bit_training_guard, kbit_dtype
from plugtune.plugins import (
    PluginError,
    get_plugin_manager,
    resolve_family,
    resolve_method,
    route_model,
)
from plugtune.rundir import _atomic_write, save_run
from plugtune.runstate import RunStateError, TrainingInterrupted, prepare_output_dir
from plugtune.spec import Method, ModelSpec, resolve_dtype
from plugtune.trainer import (
    COMPLETE_MARKER,
    CompleteCheckpointCallback,
    MethodContext,
    PlugtuneSeq2SeqTrainer,
    PlugtuneTrainer,
    RunResult,
    TrainingError,
    _deepspeed_config,
    _zero_stage,
    apply_adapter,
    count_parameters,
    last_complete_checkpoint,
    lora_config,
    prepare_base,
    training_arguments,
    training_kwargs,
)

__all__ = [  # re-exported: tests and plugins import these from plugtune.train
    "COMPLETE_MARKER", "CompleteCheckpointCallback", "MethodContext", "PlugtuneSeq2SeqTrainer",
    "PlugtuneTrainer", "RunResult", "TrainingError", "_atomic_write", "_deepspeed_config",
    "apply_adapter", "build_spec", "check_packing", "count_parameters", "last_complete_checkpoint", "lora_config",
    "prepare_base", "prepare_run", "read_model_type", "resolve_run_method", "save_run", "train",
    "training_arguments", "training_kwargs", "TrainingInterrupted"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# spec


def read_model_type(path: str, trust_remote_code: bool = False, revision: str | None = None) -> tuple[str, Any]:
    """``(config.model_type, config)`` of a local folder or hub id.

    A local ``config.json`` is read as JSON first, so legacy types (``RefinedWeb``) route to
    their plugin even when transformers no longer knows them; ``config`` is then ``None`` when
    transformers cannot build it.
    """
    from transformers import AutoConfig

    p = Path(path)
    if (p / "config.json").is_file():
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
        mt = raw.get("model_type")
        try:
            cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception:  # unknown / remote-code types: the plugin maps them
            cfg = None
        if not mt:
            raise TrainingError(f"{p / 'config.json'} has no model_type")
        return mt, cfg
    if p.exists() or path.startswith((".", "/", "~")):
        raise TrainingError(f"base_model {path!r}: no config.json there")
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:
        raise TrainingError(f"base_model {path!r}: cannot read its config ({exc})") from exc
    return cfg.model_type, cfg


def build_spec(recipe: Recipe, pm) -> ModelSpec:
    """Resolve the family for ``recipe.base_model`` and the dtype/quantization policy.

    The route: ``recipe.model_type`` when set (an override, routed by name); else the plugin
    that claims ``config.model_type``; else the generic route decided from the config
    (:func:`plugtune.plugins.route_model`), whose one-line note is kept in
    ``spec.extra["route_note"]``. ``spec.model_type`` stays the checkpoint's own
    ``config.model_type`` (e.g. ``"qwen3"``) while ``spec.family`` is the generic one.

    Raises:
        plugtune.plugins.UnknownModelError: no route (encoder-only, no generative class ...).
        TrainingError: no config.json, unreadable GGUF.
    """
    from plugtune import demo
    from plugtune.export import gguf

    path = demo.materialize(recipe.base_model)
    try:  # a .gguf base: its de-quantized, cached safetensors folder
        src, path = gguf.find_gguf(path), gguf.materialize(path)
    except gguf.GGUFError as exc:
        raise TrainingError(str(exc)) from exc
    if path != recipe.base_model:
        recipe = recipe.model_copy(update={"base_model": path})
    model_type, cfg = read_model_type(path, recipe.trust_remote_code, recipe.revision)
    if recipe.model_type:  # the override routes by name, as before
        route, route_note = resolve_family(pm, recipe.model_type), ""
    else:  # a claiming plugin, else the generic route decided from the config
        route, route_note = route_model(pm, model_type, cfg)  # prepare_run says the note
    dtype, note = kbit_dtype(resolve_dtype(recipe.dtype), recipe.quantization)
    if note:
        log.warning(note)
    extra: dict[str, Any] = {"gguf_source": str(src)} if src else {}
    if route_note:
        extra["route_note"] = route_note
    return ModelSpec(path=path, model_type=recipe.model_type or model_type, family=route.family,
                     plugin=route.plugin, recipe=recipe, hf_config=cfg, torch_dtype=dtype,
                     quantization=recipe.quantization, extra=extra)


def check_packing(recipe: Recipe, model_type: str, config: Any, family) -> None:
    """Refuse ``sample_packing`` / ``eval_sample_packing: true`` before the model loads when
    packed samples would not get the logits they have alone
    (:func:`plugtune.architectures.packing_support`).

    Raises:
        TrainingError: names the model type, the layer kind and the fix (``sample_packing:
            false``).
    """
    from plugtune.architectures import packing_support

    keys = [k for k in ("sample_packing", "eval_sample_packing") if getattr(recipe, k)]
    if not keys:
        return
    if config is None and getattr(family, "packing", "auto") == "auto":
        # transformers cannot read it, so only a plugin routes it (the generic route refuses
        # such configs) and that plugin maps the config itself (legacy Falcon ``RefinedWeb``)
        return
    verdict = packing_support(config, family)
    if not verdict.exact:
        raise TrainingError(
            f"{recipe.base_model}: {' / '.join(f'{k}: true' for k in keys)} is refused for "
            f"{model_type}: {verdict.reason}. Set {' and '.join(f'{k}: false' for k in keys)} "
            f"(samples are then padded one per row and trained exactly)")


# ---------------------------------------------------------------------------------------------
# run


def resolve_run_method(recipe: Recipe, pm, data_kind: str) -> Method:
    """The :class:`Method` of this run: the recipe's ``rl`` (``reward_model: true`` ->
    ``reward``); unset, ``dpo`` for preference data and ``sft`` otherwise.

    Raises:
        TrainingError: the method is not installed (lists the installed ones), or it does not
            accept the data's kind.
    """
    name = recipe.method or ("dpo" if data_kind == "preference" else "sft")
    try:
        method = resolve_method(pm, name)
    except PluginError as exc:
        raise TrainingError(str(exc)) from None
    if method.data_kinds and data_kind not in method.data_kinds:
        raise TrainingError(
            f"rl: {name} needs {' or '.join(method.data_kinds)} data (e.g. datasets of type: "
            f"preference with prompt/chosen/rejected pairs for pair methods); the recipe's "
            f"datasets are of kind {data_kind!r}")
    return method


def train(recipe: Recipe, pm=None, resume: bool = False, console=None,
          overwrite: bool = False) -> RunResult:
    """Run one training run and write the run directory.

    ``recipe.output_dir`` follows :func:`plugtune.runstate.prepare_output_dir`: a folder holding
    another run is refused unless ``resume`` (continue this run from its newest complete
    checkpoint; a checkpoint of another run is never taken) or ``overwrite`` (remove the old
    run's files, naming each). This check runs before any model loads.

    Raises:
        TrainingError: non-finite or stuck-at-0 loss (names the step), nothing to resume from,
            the checkpoint to resume already reached the run's end ("run already complete"),
            a ``report_to`` backend that is not installed (names the ``plugtune[...]`` extra),
            the folder holds another run, a method that does not fit the data.
        plugtune.runstate.TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved at that
            step and the message holds the command that continues the run.
        plugtune.plugins.PluginError: no plugin / conflicting plugins for the model.
        plugtune.data.DataError: bad input data.
    """
    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

    from plugtune import observe
    from plugtune.scale import ensure_cpu_process_group

    try:  # report_to packages present before any model loads
        observe.check_reporting(recipe)
    except observe.ReportingError as exc:
        raise TrainingError(str(exc)) from None
    ensure_cpu_process_group()  # N CPU processes from a launcher: one DDP run, not N copies
    first_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        ckpt = prepare_output_dir(recipe, resume=resume, overwrite=overwrite, say=say,
                                  write=first_rank)
    except RunStateError as exc:
        raise TrainingError(str(exc)) from None
    ctx = prepare_run(recipe, pm, resume=ckpt or False, console=console)
    return ctx.method.load_run()(ctx)


def prepare_run(recipe: Recipe, pm=None, resume=False, console=None) -> MethodContext:
    """Everything up to the method: family route, ``plugtune_load``, the data pipeline and the
    method resolved from ``rl``. Returns the :class:`MethodContext` its ``run`` gets (tests
    build a method's trainer from it). ``resume``: the checkpoint to continue from (or
    ``False``), as :func:`plugtune.runstate.prepare_output_dir` answered.

    Raises:
        TrainingError, PluginError, DataError: as :func:`train`.
    """
    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

    pm = pm or get_plugin_manager()
    spec = build_spec(recipe, pm)
    # before the model loads; only for training (a packed run's merge/generate never packs)
    check_packing(spec.recipe, getattr(spec.hf_config, "model_type", None) or spec.model_type,
                  spec.hf_config, spec.family)
    transformers.set_seed(recipe.seed)
    user_recipe, recipe = recipe, spec.recipe  # user_recipe keeps demo:// names (portable)

    if spec.extra.get("route_note"):
        say(f"plugtune: {spec.extra['route_note']}")
    say(f"plugtune: {spec.path}: model_type={spec.model_type} family={spec.family.name} "
        f"(plugin {spec.plugin}) dtype={str(spec.torch_dtype).replace('torch.', '')} "
        f"adapter={recipe.adapter}{' ' + spec.quantization if spec.quantization else ''}")
    t0 = time.perf_counter()
    # ZeRO-3: TrainingArguments must exist before the model loads, so from_pretrained partitions
    # the weights as they load (deepspeed.zero.Init) instead of materialising them on every rank
    ds_args = (training_arguments(recipe, spec, False, spec.task == "seq2seq")
               if recipe.deepspeed and _zero_stage(recipe.deepspeed) == 3 else None)
    loaded = pm.hook.plugtune_load(spec=spec)
    del ds_args
    if loaded is None:
        raise TrainingError(f"no plugin loaded {spec.path!r} (family {spec.family.name})")
    model, tokenizer = loaded.model, loaded.tokenizer
    try:  # MoE: router auxiliary loss on (and logged), routers frozen
        for note in moe.configure(spec, model):
            say(f"plugtune: {note}")
    except moe.MoeError as exc:
        raise TrainingError(str(exc)) from None
    if spec.quantization == "4bit":
        cpu_4bit_fallback(model)  # shapes bitsandbytes' packed CPU kernel cannot take
        cpu_4bit_training_guard(model)  # no packed inference layout mid-training (BLOOM biases)
    encode = None
    if spec.task == "vision":  # processor-based tokenization (image token expansion)
        from plugtune.data.pipeline import hook_encoder

        encode = hook_encoder(pm, spec, loaded.processor, tokenizer)
    data = prepare(recipe, tokenizer, spec.task, encode=encode,
                   chat_rows=pm.hook.plugtune_chat_rows(spec=spec, tokenizer=tokenizer))
    method = resolve_run_method(recipe, pm, data.kind)
    return MethodContext(recipe=recipe, user_recipe=user_recipe, spec=spec, pm=pm, model=model,
                         tokenizer=tokenizer, data=data, method=method, processor=loaded.processor,
                         resume=resume, console=console, started=t0)
