"""What every training method shares: the hook-driven Trainer, checkpoint markers, adapters,
``TrainingArguments`` from the recipe, and the :class:`MethodContext` a method's ``run`` gets.

Methods (``plugtune.methods.*``) and the run (``plugtune.train``) both import this module; it
imports neither (see ``tests/test_import_cycles.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback

from plugtune import observe
from plugtune.config import Recipe
from plugtune.run_control import LossGuard, RunControlCallback, seeded_train_sampler
from plugtune.runstate import (  # noqa: F401 (COMPLETE_MARKER re-exported)
    COMPLETE_MARKER,
    interrupted_message,
    last_complete_checkpoint,
)
from plugtune.spec import Method, ModelSpec
from plugtune.token_rows import trainable_token_indices
from plugtune.trainer_options import adjust_training_kwargs, lora_variant_kwargs

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, no checkpoint to resume, ...)."""


# ---------------------------------------------------------------------------------------------
# trainer


class PlugtuneTrainer(Trainer):
    """``transformers.Trainer`` whose loss comes from the ``plugtune_train_step`` hook.

    Stops with :class:`TrainingError` naming the step when the loss turns NaN/inf.
    """

    def __init__(self, *args, plugin_manager=None, spec: ModelSpec | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pm = plugin_manager
        self.spec = spec

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, with the trained token rows (:mod:`plugtune.token_rows`) in
        their own parameter groups at ``token_rows_lr_scale`` x the learning rate."""
        from plugtune.token_rows import scale_token_rows_lr

        opt = super().create_optimizer(*args, **kwargs)
        if self.spec is not None:
            scale_token_rows_lr(opt, self.model, self.spec.recipe.token_rows_lr_scale)
        return opt

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, plus ``aux_loss`` (:func:`with_aux_loss`)."""
        super().log(with_aux_loss(self, logs), *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # group_by_length from a seeded generator: a resumed run replays the epoch's order
        return seeded_train_sampler(self, train_dataset) or Trainer._get_train_sampler(self, train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = num_items_in_batch if self.model_accepts_loss_kwargs else None
        inputs = {k: v for k, v in inputs.items() if k != "length"}
        loss = self.pm.hook.plugtune_train_step(spec=self.spec, model=model, batch=inputs,
                                                num_items_in_batch=n)
        if loss is None:
            raise TrainingError(f"no plugin computed a loss for family {self.spec.family.name!r}")
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and n is not None):
            loss = loss * self.accelerator.num_processes
        if model.training:
            guard = self.__dict__.setdefault("_loss_guard", LossGuard())
            labels = inputs.get("labels")
            trained = int((labels != -100).sum()) if labels is not None else None
            why = guard.check(loss, self.state.global_step + 1, trained)
            if why:
                raise TrainingError(
                    f"{why}; stopping. Lower learning_rate, use bf16/fp32 instead of fp16, or "
                    f"check the data. {interrupted_message(self.args.output_dir)}")
        return (loss, {"loss": loss}) if return_outputs else loss


def with_aux_loss(trainer, logs: dict[str, float]) -> dict[str, float]:
    """``logs`` plus ``aux_loss`` at training logging steps: the mean router auxiliary loss of
    the training forwards since the last log, for MoE models that compute one
    (:mod:`plugtune.moe`); ``logs`` unchanged otherwise."""
    if "loss" in logs:
        from plugtune.moe import pop_aux_loss

        aux = pop_aux_loss(trainer.model)
        if aux is not None:
            return {**logs, "aux_loss": round(aux, 6)}
    return logs


try:  # seq2seq variant for encoder-decoder families (T5)
    from transformers import Seq2SeqTrainer

    class PlugtuneSeq2SeqTrainer(Seq2SeqTrainer):  # type: ignore[misc]
        """``Seq2SeqTrainer`` with :class:`PlugtuneTrainer`'s hook-driven ``compute_loss``."""

        def __init__(self, *args, plugin_manager=None, spec: ModelSpec | None = None, **kwargs):
            # not PlugtuneTrainer.__init__: its zero-argument super() is bound to PlugtuneTrainer
            super().__init__(*args, **kwargs)
            self.pm = plugin_manager
            self.spec = spec

        compute_loss = PlugtuneTrainer.compute_loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            """The Trainer's log, plus ``aux_loss`` (:func:`with_aux_loss`)."""
            super().log(with_aux_loss(self, logs), *args, **kwargs)
        _get_train_sampler = PlugtuneTrainer._get_train_sampler
except ImportError:  # pragma: no cover
    PlugtuneSeq2SeqTrainer = PlugtuneTrainer  # type: ignore[misc,assignment]


class CompleteCheckpointCallback(RunControlCallback):
    """Marks each checkpoint complete and stamps it with the run's identity; SIGINT/SIGTERM save a
    checkpoint and stop; the loss is logged at every save (see
    :class:`plugtune.run_control.RunControlCallback`)."""


class RunObserver(TrainerCallback):
    """A ``TrainerCallback`` that adds, at each training logging step, to the ``logs`` dict
    (and the matching ``log_history`` entry):

    * ``tokens_per_second``: real tokens (:func:`plugtune.observe.real_tokens`) trained by
      this process since the previous logging step / wall seconds since then, less the time of
      evaluations and checkpoint saves in between (from each ``on_step_end`` before one to
      the next ``on_step_begin``);
    * ``tokens_seen``: real tokens trained by this process in this session;
    * ``peak_memory_mib``: :func:`plugtune.observe.peak_memory_mib` of the training device.

    Token counts come from :meth:`count`, which :func:`attach` calls for every training
    micro-batch the Trainer's ``compute_loss`` sees. It runs before the Trainer's printer and
    the ``report_to`` callbacks, so they show the keys too.
    """

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id
        self.tokens_seen = 0
        self.started: float | None = None
        self.ended: float | None = None
        self._last_t = 0.0
        self._last_tokens = 0
        self.device: Any = None
        self.paused_s = 0.0  # evaluation + checkpoint saving inside trainer.train()
        self._paused_at_log = 0.0
        self._step_end: float | None = None
        self._in_pause = False

    def count(self, inputs: dict) -> None:
        """Add one training micro-batch's real tokens."""
        self.tokens_seen += observe.real_tokens(inputs, self.pad_token_id)

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = args.device
        self.started = self._last_t = time.perf_counter()
        self._last_tokens = self.tokens_seen

    def _resume(self, now: float) -> None:
        if self._in_pause and self._step_end is not None:
            self.paused_s += now - self._step_end
        self._in_pause = False

    def on_step_begin(self, args, state, control, **kwargs):
        self._resume(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self._in_pause = True

    def on_save(self, args, state, control, **kwargs):
        self._in_pause = True

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()
        self._resume(self.ended)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.started is None:
            return  # eval logs and the final train_* summary carry no step throughput
        now = time.perf_counter()
        busy = now - self._last_t - (self.paused_s - self._paused_at_log)
        self._paused_at_log = self.paused_s
        added = {
            "tokens_per_second": round((self.tokens_seen - self._last_tokens)
                                       / max(busy, 1e-9), 1),
            "tokens_seen": self.tokens_seen,
            "peak_memory_mib": observe.peak_memory_mib(self.device),
        }
        self._last_t, self._last_tokens = now, self.tokens_seen
        logs.update(added)
        hist = state.log_history
        if hist and hist[-1].get("loss") == logs["loss"] and "tokens_seen" not in hist[-1]:
            hist[-1].update(added)  # Trainer.log appended a copy before calling on_log

    def metrics(self) -> dict[str, float | int]:
        """``tokens_seen``, ``real_tokens_per_second`` (over ``trainer.train()``'s wall time
        less its evaluations and checkpoint saves) and ``peak_memory_mib``, once training
        ended (zeros before it started)."""
        seconds = (((self.ended or time.perf_counter()) - self.started - self.paused_s)
                   if self.started else 0.0)
        return {"tokens_seen": self.tokens_seen,
                "real_tokens_per_second": round(self.tokens_seen / max(seconds, 1e-9), 1)
                if self.tokens_seen else 0.0,
                "peak_memory_mib": observe.peak_memory_mib(self.device)}


def attach(trainer) -> RunObserver:
    """Put a :class:`RunObserver` first among ``trainer``'s callbacks and count the real tokens
    of every training micro-batch its ``compute_loss`` gets (the instance's bound method is
    wrapped; evaluation batches, with the model in eval mode, are not counted). Works for
    ``Trainer``, ``Seq2SeqTrainer`` and TRL's trainers alike. Returns the observer."""
    tok = getattr(trainer, "processing_class", None)
    tok = getattr(tok, "tokenizer", tok)  # a processor holds its tokenizer
    obs = RunObserver(getattr(tok, "pad_token_id", None))
    trainer.callback_handler.callbacks.insert(0, obs)
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training and isinstance(inputs, dict):
            obs.count(inputs)
        return inner(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return obs


# ---------------------------------------------------------------------------------------------
# adapters


def prepare_base(spec: ModelSpec, model, gradient_checkpointing: bool | None = None):
    """Prepare a k-bit base for training (``prepare_model_for_kbit_training``) and turn on
    gradient checkpointing when the recipe asks for it. Returns the model."""
    recipe = spec.recipe
    gc = recipe.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    if spec.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc and not recipe.fsdp:  # under FSDP: fsdp_config activation_checkpointing instead
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(spec: ModelSpec, model, pm, token_rows: Sequence[int] = ()):
    """The ``peft.LoraConfig`` of the recipe, with targets from ``plugtune_target_modules``;
    ``token_rows``: token ids whose embedding/output rows are trained too
    (:func:`plugtune.token_rows.rows_to_train`).

    MoE models (:mod:`plugtune.moe`): the targets become exact module names without routers or
    routed experts; ``lora_target_parameters`` adds the experts (peft ``target_parameters``),
    ``moe_train_router`` the routers (``modules_to_save``).

    Raises:
        TrainingError: no plugin names target modules for the model; an MoE target the model
            cannot take (a router or expert named in ``lora_target_modules``, expert weights
            with ``lora_dropout`` > 0, names that match nothing).
    """
    from peft import LoraConfig, TaskType

    from plugtune import moe

    recipe = spec.recipe
    targets = pm.hook.plugtune_target_modules(spec=spec, model=model, method=recipe.lora_target_modules)
    if not targets:
        raise TrainingError(f"no plugin named LoRA target modules for {spec.model_type!r}")
    try:  # MoE: exact modules, never a router or routed expert; experts opt-in (plugtune.moe)
        targets = moe.resolve_targets(model, targets,
                                      explicit=isinstance(recipe.lora_target_modules, list))
        extras = moe.lora_extras(spec, model)
    except moe.MoeError as exc:
        raise TrainingError(str(exc)) from None
    if extras.get("expert_modules"):  # MoE experts as nn.Linear: targets are full names here
        targets = [*targets, *extras.pop("expert_modules")]
    to_save = [*(recipe.lora_modules_to_save or []), *extras.pop("modules_to_save", [])] or None
    task = TaskType.SEQ_2_SEQ_LM if spec.task == "seq2seq" else TaskType.CAUSAL_LM
    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=targets, modules_to_save=to_save, **extras,
                      trainable_token_indices=trainable_token_indices(
                          model, token_rows, recipe.lora_modules_to_save),
                      bias="none", task_type=task, **lora_variant_kwargs(recipe))


def apply_adapter(spec: ModelSpec, model, pm, token_rows: Sequence[int] = ()):
    """Wrap ``model`` with LoRA (peft) per the recipe; prepare k-bit bases for training.

    Returns the (possibly wrapped) model. Full fine-tuning returns ``model`` unchanged.
    """
    recipe = spec.recipe
    model = prepare_base(spec, model)
    if recipe.adapter == "none":
        return model
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(spec, model, pm, token_rows))
    if recipe.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (full sizes also under DeepSpeed ZeRO-3, whose
    partitioned parameters report ``numel() == 0`` and keep the real size in ``ds_numel``)."""
    def n(p) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    trainable = sum(n(p) for p in model.parameters() if p.requires_grad)
    total = sum(n(p) for p in model.parameters())
    return trainable, total


def adapter_targets(model) -> str:
    """What the adapter wraps, for the console: ``" (LoRA on q_proj, v_proj)"``, with
    ``target_parameters`` (MoE experts) and ``modules_to_save`` when set; ``""`` for a model
    without a peft adapter (full fine-tuning)."""
    cfg = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    if cfg is None:
        return ""

    def names(value) -> str:
        if value is None:
            return ""
        return value if isinstance(value, str) else ", ".join(sorted(value))

    parts = [names(getattr(cfg, "target_modules", None))]
    if getattr(cfg, "target_parameters", None):
        parts.append(f"parameters {names(cfg.target_parameters)}")
    if getattr(cfg, "modules_to_save", None):
        parts.append(f"trained in full {names(cfg.modules_to_save)}")
    kind = str(getattr(getattr(cfg, "peft_type", None), "value", "adapter"))
    kind = {"LORA": "LoRA", "ADALORA": "AdaLoRA"}.get(kind, kind)
    return f" ({kind} on {'; '.join(p for p in parts if p)})"


# ---------------------------------------------------------------------------------------------
# run


@dataclass
class RunResult:
    """What :func:`train` returns."""

    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict] = field(default_factory=list)


def training_arguments(recipe: Recipe, spec: ModelSpec, has_eval: bool, seq2seq: bool):
    """``TrainingArguments`` (or ``Seq2SeqTrainingArguments``) from the recipe."""
    cls = transformers.Seq2SeqTrainingArguments if seq2seq else transformers.TrainingArguments
    return cls(**training_kwargs(recipe, spec, has_eval, seq2seq))


def training_kwargs(recipe: Recipe, spec: ModelSpec, has_eval: bool, seq2seq: bool = False) -> dict:
    """The keyword arguments of ``TrainingArguments`` from the recipe (also fed to TRL configs,
    which subclass ``TrainingArguments``)."""
    dtype = spec.torch_dtype
    # multipack_real_batches: false -> the data holds one packed row per micro-batch
    long_rows = (recipe.sample_packing and not recipe.multipack_real_batches
                 and spec.task == "causal" and recipe.rl in (None, "sft"))
    pack_eval = recipe.eval_sample_packing if recipe.eval_sample_packing is not None else recipe.sample_packing
    kwargs: dict[str, Any] = dict(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=1 if long_rows else recipe.micro_batch_size,
        per_device_eval_batch_size=(1 if long_rows and pack_eval
                                    else recipe.eval_batch_size or recipe.micro_batch_size),
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        # transformers 5: an int is a step count, a float in [0, 1) a ratio of all steps
        warmup_steps=recipe.warmup_steps or recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        optim=recipe.optimizer,
        max_grad_norm=recipe.max_grad_norm,
        num_train_epochs=recipe.num_epochs,
        max_steps=recipe.max_steps,
        logging_steps=recipe.logging_steps,
        save_strategy="steps" if recipe.save_steps else "epoch",
        save_total_limit=recipe.save_total_limit,
        eval_strategy=("steps" if recipe.eval_steps else "epoch") if has_eval else "no",
        bf16=dtype == torch.bfloat16 and spec.quantization is None and torch.cuda.is_available(),
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        report_to=recipe.report_to,
        seed=recipe.seed,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length"
        if recipe.group_by_length and not recipe.sample_packing else "random",
        length_column_name="length",
        deepspeed=_deepspeed_config(recipe.deepspeed),
        logging_first_step=True,
        prediction_loss_only=True,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_fsdp_kwargs(recipe),
    )
    kwargs.update(liger_training_kwargs(spec))
    if recipe.save_steps:
        kwargs["save_steps"] = recipe.save_steps
    if recipe.eval_steps and has_eval:
        kwargs["eval_steps"] = recipe.eval_steps
    if seq2seq:
        kwargs["predict_with_generate"] = False
        kwargs["generation_max_length"] = recipe.generation.max_new_tokens
    return adjust_training_kwargs(recipe, kwargs)


def liger_training_kwargs(spec: ModelSpec) -> dict:
    """``use_liger_kernel`` / ``liger_kernel_config`` when ``liger_kernel: true`` can be honoured
    here (CUDA + liger-kernel + a model type Liger patches; else one notice and ``{}``). See
    :mod:`plugtune.kernels`."""
    from plugtune import kernels

    if spec.task != "causal":
        if spec.recipe.liger_kernel:
            log.warning("liger_kernel: true is for decoder-only models; %s (%s) trains without it",
                        spec.model_type, spec.task)
        return {}
    # Liger's table is keyed by the architecture's own model_type, not a routing override
    model_type = getattr(spec.hf_config, "model_type", None) or spec.model_type
    return kernels.training_kwargs(kernels.plan_liger(spec.recipe, model_type))


def _deepspeed_config(value: str | None):
    if not value:
        return None
    from plugtune import scale

    cfg = scale.deepspeed_config(value)
    scale.ensure_distributed_env()  # single process without a launcher: rank 0 of 1
    return cfg


def _fsdp_kwargs(recipe: Recipe) -> dict:
    """``fsdp`` / ``fsdp_config`` for ``TrainingArguments``; ``{}`` in a single process (FSDP
    shards across the processes of a launch; transformers refuses it without one)."""
    if not recipe.fsdp:
        return {}
    from plugtune import scale

    cfg = scale.fsdp_config(recipe.fsdp, recipe.gradient_checkpointing)  # validate either way
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        log.warning("fsdp: %s needs a multi-process launch (accelerate launch --num_processes N "
                    "-m plugtune train ...); this single process trains unsharded", recipe.fsdp)
        return {}
    return {"fsdp": True, "fsdp_config": cfg}


def _zero_stage(value: str) -> int:
    from plugtune import scale

    return scale.zero_stage(value)


@dataclass
class MethodContext:
    """Everything a method's ``run(ctx)`` gets (see :class:`plugtune.spec.Method`).

    Attributes:
        recipe: the validated recipe, paths resolved (``demo://`` materialised).
        user_recipe: the recipe as the user wrote it (saved into the run directory).
        spec: the resolved model spec; ``pm``: the plugin manager.
        model, tokenizer, processor: from ``plugtune_load`` (no adapter applied yet).
        data: :class:`plugtune.data.PreparedData` (its ``kind`` is one the method accepts).
        method: the :class:`Method` that runs.
        resume: the checkpoint to continue from (chosen by :func:`plugtune.train.train`, which
            never picks another run's), or ``True``: the newest complete one in ``output_dir``.
        console: a ``rich`` console for progress lines, or ``None`` (logging).
        started: ``time.perf_counter()`` when the run started (for ``data_prep_seconds``).
    """

    recipe: Recipe
    user_recipe: Recipe
    spec: ModelSpec
    pm: Any
    model: Any
    tokenizer: Any
    data: Any
    method: Method
    processor: Any = None
    resume: bool | Path = False
    console: Any = None
    started: float = field(default_factory=time.perf_counter)

    def say(self, msg: str) -> None:
        """Print a progress line (console) or log it."""
        if self.console is not None:
            self.console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from (``None`` when not resuming).

        Raises:
            TrainingError: ``resume`` is set and there is no complete checkpoint.
        """
        if not self.resume:
            return None
        ckpt = (Path(self.resume) if isinstance(self.resume, str | Path)
                else last_complete_checkpoint(self.recipe.output_dir))
        if ckpt is None:
            raise TrainingError(f"--resume: no complete checkpoint in {self.recipe.output_dir}")
        self.say(f"plugtune: resuming from {ckpt}")
        return ckpt


# ---------------------------------------------------------------------------------------------
# what the alignment methods share


def first_last(history: list[dict], key: str) -> tuple[float | None, float | None]:
    """The first and last logged values of ``key`` in a Trainer ``log_history``."""
    vals = [h[key] for h in history if key in h]
    return (vals[0], vals[-1]) if vals else (None, None)


def preference_rows(ctx: MethodContext) -> tuple[Any, Any, dict]:
    """Tokenize the run's preference pairs (kind ``"preference"``) or unpaired rows (kind
    ``"kto"``) with :mod:`plugtune.data.preference`: the chat template applied once, one BOS,
    the prompt boundary exact, each answer ending on the stop token.

    Sets the recipe's ``chat_template`` on the tokenizer first (resizing the embeddings when it
    adds tokens). Returns ``(train_rows, eval_rows or None, stats)``.

    Raises:
        TrainingError: a non-causal family.
        plugtune.data.DataError: bad rows (identical answers, unsplittable template).
    """
    from plugtune.data.preference import tokenize_preferences, tokenize_unpaired
    from plugtune.data.templates import ensure_chat_template
    from plugtune.data.tokenize import probe_template

    recipe, spec, data, tokenizer = ctx.recipe, ctx.spec, ctx.data, ctx.tokenizer
    if spec.task != "causal":
        raise TrainingError(f"rl: {ctx.method.name} supports decoder-only (causal) families; "
                            f"{spec.family.name!r} is {spec.task}")
    from plugtune.modeling import new_tokens

    added = [*data.added_tokens, *ensure_chat_template(tokenizer, recipe.chat_template)]
    # + the recipe's special_tokens added at load time; their rows train (policy_and_reference)
    data.added_tokens = new_tokens(ctx.model, tokenizer, added)
    if data.added_tokens:
        ctx.model.resize_token_embeddings(len(tokenizer))
    info = probe_template(tokenizer)
    fn = tokenize_unpaired if data.kind == "kto" else tokenize_preferences
    train_rows, stats = fn(data.raw_train, tokenizer, info, recipe.sequence_len)
    eval_rows = None
    if data.raw_eval is not None and len(data.raw_eval):
        eval_rows, stats["eval"] = fn(data.raw_eval, tokenizer, info, recipe.sequence_len)
    ctx.say(f"plugtune: {ctx.method.name} data: "
            f"{json.dumps({k: v for k, v in stats.items() if k != 'eval'})}")
    from plugtune.data.pipeline import data_loss_warning

    counts = {"samples": stats.get("pairs", stats.get("examples", 0)),
              "truncated": stats.get("truncated", 0), "dropped": stats.get("dropped", 0)}
    if (warning := data_loss_warning(counts, recipe)) is not None:
        log.warning(warning)
    return train_rows, eval_rows, {**data.stats, **stats, "kind": data.kind}


def policy_and_reference(ctx: MethodContext, needs_reference: bool = True
                         ) -> tuple[Any, Any, Any, str]:
    """The policy model, the reference model, the ``peft_config`` for TRL and a description.

    LoRA / QLoRA: TRL wraps the model with ``peft_config``; the reference is the same model with
    the adapter disabled (no second copy of the weights); a k-bit base is prepared first.
    Full fine-tuning: an explicit frozen deep copy of the initial model when
    ``needs_reference`` (ORPO, CPO/SimPO and reward models need none).

    Returns:
        ``(model, ref_model or None, peft_config or None, reference description)``.
    """
    import copy

    spec, model = ctx.spec, ctx.model
    if ctx.recipe.adapter == "none":
        if not needs_reference:
            return model, None, None, "none (reference-free method)"
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        return model, ref, None, "frozen copy of the initial model"
    if spec.quantization is not None:
        model = prepare_base(spec, model)
    token_rows: list[int] = []
    if spec.task == "causal":  # added tokens' embedding/output rows train with the adapter
        from plugtune.token_rows import rows_to_train

        token_rows, notice = rows_to_train(model, ctx.tokenizer, ctx.data.added_tokens, [], [],
                                           ctx.recipe.train_token_rows)
        if notice:
            ctx.say(f"plugtune: {notice}")
    desc = ("base model with the adapter disabled" if needs_reference
            else "none (reference-free method)")
    return model, None, lora_config(spec, model, ctx.pm, token_rows), desc


def fit_and_save(ctx: MethodContext, trainer, metrics: dict, stats: dict,
                 watch: tuple[str, ...] = (), after=None) -> RunResult:
    """Train (resuming when asked), evaluate on the eval rows, write the run directory.

    ``watch``: logged keys (``rewards/accuracies`` ...) whose first and last values go into
    the metrics as ``first_<key>`` / ``last_<key>`` (``/`` -> ``_``; left out when never
    logged). ``after(trainer)``: a method's own measurement after training (it updates
    ``metrics``), before the save. A :class:`RunObserver` adds tokens/s and peak memory to
    every logging step; the metrics get :func:`plugtune.observe.run_metrics` (``tokens_seen``,
    ``real_tokens_per_second``, ``peak_memory_mib``, ``wall_seconds``) and never hold ``None``.

    Returns:
        :class:`RunResult`.
    """
    import math

    from plugtune.rundir import save_run
    from plugtune.scale import gathered_state_dict

    trainable, total = count_parameters(trainer.model)
    metrics.setdefault("data_prep_seconds", round(time.perf_counter() - ctx.started, 2))
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_share=round(trainable / max(total, 1), 6))
    ctx.say(f"plugtune: {ctx.method.name}: reference: {metrics.get('reference')}; "
            f"trainable parameters: {trainable:,} / {total:,}{adapter_targets(trainer.model)}")
    from plugtune.run_control import fix_train_loss_entry, whole_run_loss

    ckpt = ctx.resume_checkpoint()
    observer = attach(trainer)
    t1 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    hist = trainer.state.log_history
    run_loss = whole_run_loss(hist)  # every step, also after a resume
    fix_train_loss_entry(hist, run_loss)
    metrics.update(train_loss=run_loss if run_loss is not None else out.training_loss,
                   train_seconds=round(time.perf_counter() - t1, 2),
                   global_step=trainer.state.global_step)
    moved = []
    for key in watch:
        a, b = first_last(hist, key)
        if a is None:  # never logged (metrics.json holds only what was measured)
            continue
        name = key.replace("/", "_")
        metrics[f"first_{name}"], metrics[f"last_{name}"] = a, b
        moved.append(f"{key} {a} -> {b}")
    if after is not None:
        after(trainer)
    if trainer.eval_dataset is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if k.startswith("eval_")})
        if ev.get("eval_loss") is not None and not math.isfinite(ev["eval_loss"]):
            log.warning("eval loss is not finite: %s", ev["eval_loss"])
    out_dir = Path(ctx.recipe.output_dir)
    metrics.update(observe.run_metrics(observer, hist, ctx.started))
    metrics = observe.without_nulls(metrics)
    state_dict = gathered_state_dict(trainer)  # a collective under ZeRO-3 / FSDP: every rank
    if trainer.is_world_process_zero():  # one writer, not one per rank
        save_run(out_dir, trainer.model, ctx.tokenizer, ctx.user_recipe, ctx.spec, metrics, hist,
                 stats, state_dict=state_dict)
        ctx.say(f"plugtune: {ctx.method.name}: {', '.join(moved) or 'trained'}; "
                f"run saved to {out_dir}")
    trainer.accelerator.wait_for_everyone()  # no rank returns before the run folder exists
    return RunResult(output_dir=out_dir, metrics=metrics, log_history=hist)


def stop_on_nonfinite(trainer, loss, what: str) -> None:
    """Raise :class:`TrainingError` naming the step when a training ``loss`` is NaN/inf (the
    message says which checkpoint exists and how to resume)."""
    if trainer.model.training and not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"{what} loss became {loss.item()} at step {trainer.state.global_step + 1}; stopping. "
            "Lower learning_rate or beta, use bf16/fp32 instead of fp16. "
            f"{interrupted_message(trainer.args.output_dir)}")
