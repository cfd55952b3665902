"""Build and run one training run from a recipe.

recipe -> plugin manager -> family route -> ``plugtune_load`` -> data pipeline -> adapter (peft)
-> ``plugtune_collate`` -> ``transformers.Trainer`` (``Seq2SeqTrainer`` for encoder-decoder
families) whose ``compute_loss`` calls ``plugtune_train_step`` -> run directory.

The run directory holds the adapter (or full weights) in standard PEFT / transformers format,
the tokenizer, ``recipe.yaml``, ``metrics.json``, ``loss.png`` and a model card ``README.md``.
Checkpoints are marked complete only after they are fully written, so ``--resume`` never picks
a half-written one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback

from plugtune.config import Recipe, dump_recipe
from plugtune.data import prepare
from plugtune.plugins import get_plugin_manager, resolve_family
from plugtune.spec import ModelSpec, resolve_dtype
from plugtune.trainer_options import (
    adjust_training_kwargs,
    lora_variant_kwargs,
    loraplus_optimizers,
)

log = logging.getLogger(__name__)
COMPLETE_MARKER = "plugtune_checkpoint_complete"


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, no checkpoint to resume, ...)."""


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
    """Resolve the family for ``recipe.base_model`` and the dtype/quantization policy."""
    from plugtune import demo

    path = demo.materialize(recipe.base_model)
    if path != recipe.base_model:
        recipe = recipe.model_copy(update={"base_model": path})
    model_type, cfg = read_model_type(path, recipe.trust_remote_code, recipe.revision)
    route = resolve_family(pm, recipe.model_type or model_type)
    dtype = resolve_dtype(recipe.dtype)
    return ModelSpec(path=path, model_type=recipe.model_type or model_type, family=route.family,
                     plugin=route.plugin, recipe=recipe, hf_config=cfg, torch_dtype=dtype,
                     quantization=recipe.quantization)


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
        if model.training and not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; stopping. "
                "Lower learning_rate, use bf16/fp32 instead of fp16, or check the data. The last "
                f"complete checkpoint in {self.args.output_dir} is intact.")
        return (loss, {"loss": loss}) if return_outputs else loss


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
except ImportError:  # pragma: no cover
    PlugtuneSeq2SeqTrainer = PlugtuneTrainer  # type: ignore[misc,assignment]


class CompleteCheckpointCallback(TrainerCallback):
    """Write a marker into each checkpoint after it is fully saved (atomic rename)."""

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            tmp = ckpt / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"global_step": state.global_step, "time": time.time()}))
            os.replace(tmp, ckpt / COMPLETE_MARKER)
        return control


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that carries the completion marker."""
    best = None
    for d in Path(output_dir).glob("checkpoint-*"):
        if not (d / COMPLETE_MARKER).exists():
            continue
        try:
            step = int(d.name.split("-")[-1])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


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
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(spec: ModelSpec, model, pm):
    """The ``peft.LoraConfig`` of the recipe, with targets from ``plugtune_target_modules``.

    Raises:
        TrainingError: no plugin names target modules for the model.
    """
    from peft import LoraConfig, TaskType

    recipe = spec.recipe
    targets = pm.hook.plugtune_target_modules(spec=spec, model=model, method=recipe.lora_target_modules)
    if not targets:
        raise TrainingError(f"no plugin named LoRA target modules for {spec.model_type!r}")
    task = TaskType.SEQ_2_SEQ_LM if spec.task == "seq2seq" else TaskType.CAUSAL_LM
    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=targets, modules_to_save=recipe.lora_modules_to_save,
                      bias="none", task_type=task, **lora_variant_kwargs(recipe))


def apply_adapter(spec: ModelSpec, model, pm):
    """Wrap ``model`` with LoRA (peft) per the recipe; prepare k-bit bases for training.

    Returns the (possibly wrapped) model. Full fine-tuning returns ``model`` unchanged.
    """
    recipe = spec.recipe
    model = prepare_base(spec, model)
    if recipe.adapter == "none":
        return model
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(spec, model, pm))
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
    kwargs: dict[str, Any] = dict(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=recipe.micro_batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size or recipe.micro_batch_size,
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
    )
    if recipe.save_steps:
        kwargs["save_steps"] = recipe.save_steps
    if recipe.eval_steps and has_eval:
        kwargs["eval_steps"] = recipe.eval_steps
    if seq2seq:
        kwargs["predict_with_generate"] = False
        kwargs["generation_max_length"] = recipe.generation.max_new_tokens
    adjust_training_kwargs(recipe, kwargs)
    return kwargs


def _deepspeed_config(value: str | None):
    if not value:
        return None
    from plugtune import scale

    cfg = scale.deepspeed_config(value)
    scale.ensure_distributed_env()  # single process without a launcher: rank 0 of 1
    return cfg


def _zero_stage(value: str) -> int:
    from plugtune import scale

    return scale.zero_stage(value)


def _atomic_write(path: Path, data: str | bytes) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, mode) as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_run(output_dir: Path, model, tokenizer, recipe: Recipe, spec: ModelSpec, metrics: dict,
             log_history: list[dict], stats: dict, state_dict: dict | None = None,
             processor=None) -> None:
    """Write the run directory atomically: everything goes to a temp folder, then each file is
    moved into place with ``os.replace`` (a crash never leaves a half-written adapter).

    ``state_dict``: the full (gathered) weights when the live parameters are sharded, e.g.
    under DeepSpeed ZeRO-3 (see :func:`plugtune.scale.gathered_state_dict`); ``None`` saves the
    model's own parameters. ``processor`` (vision families) is saved beside the tokenizer, so
    ``plugtune generate`` rebuilds the same image preprocessing."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
    try:
        if state_dict is not None:
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (staging / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
        (staging / "log_history.json").write_text(json.dumps(log_history, indent=2, default=str))
        from plugtune.report import loss_curve_png, model_card

        loss_curve_png(log_history, staging / "loss.png")
        (staging / "README.md").write_text(model_card(recipe, spec, metrics, stats))
        for f in staging.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(recipe: Recipe, pm=None, resume: bool = False, console=None) -> RunResult:
    """Run one training run and write the run directory.

    Raises:
        TrainingError: non-finite loss (names the step), nothing to resume from.
        plugtune.plugins.PluginError: no plugin / conflicting plugins for the model.
        plugtune.data.DataError: bad input data.
    """
    from plugtune.evaluate import evaluate_generation

    pm = pm or get_plugin_manager()
    transformers.set_seed(recipe.seed)
    spec = build_spec(recipe, pm)
    user_recipe, recipe = recipe, spec.recipe  # user_recipe keeps demo:// names (portable)

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

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
    encode = None
    if spec.task == "vision":  # processor-based tokenization (image token expansion)
        from plugtune.data.pipeline import hook_encoder

        encode = hook_encoder(pm, spec, loaded.processor, tokenizer)
    data = prepare(recipe, tokenizer, spec.task, encode=encode)
    if data.kind == "preference" or recipe.rl == "dpo":
        from plugtune.dpo import train_dpo

        return train_dpo(recipe, spec, pm, model, tokenizer, data, resume=resume, console=console)
    if data.added_tokens or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # template or special_tokens added some
    prep_s = time.perf_counter() - t0
    say(f"plugtune: data: {json.dumps({k: v for k, v in data.stats.items() if k not in ('per_dataset', 'eval')})}")

    metrics: dict[str, Any] = {"data_prep_seconds": round(prep_s, 2)}
    gen_cfg = recipe.generation
    wants_gen = any(m in recipe.eval_metrics for m in ("exact_match", "rouge"))
    if recipe.eval_before_training and wants_gen and data.eval_examples:
        metrics["before"] = evaluate_generation(pm, spec, model, tokenizer, data.eval_examples,
                                                recipe.eval_metrics, gen_cfg.max_new_tokens,
                                               processor=loaded.processor)
        say(f"plugtune: before training: {metrics['before']}")

    model = apply_adapter(spec, model, pm)
    trainable, total = count_parameters(model)
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_share=round(trainable / max(total, 1), 6))
    say(f"plugtune: trainable parameters: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.3f}%)")

    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tokenizer, processor=loaded.processor)
    seq2seq = spec.task == "seq2seq"
    args = training_arguments(recipe, spec, data.eval is not None, seq2seq)
    trainer_cls = PlugtuneSeq2SeqTrainer if seq2seq else PlugtuneTrainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=collate, processing_class=tokenizer,
        callbacks=[CompleteCheckpointCallback()], plugin_manager=pm, spec=spec,
        optimizers=loraplus_optimizers(recipe, model, args))
    ckpt = None
    if resume:
        ckpt = last_complete_checkpoint(recipe.output_dir)
        if ckpt is None:
            raise TrainingError(f"--resume: no complete checkpoint in {recipe.output_dir}")
        say(f"plugtune: resuming from {ckpt}")
    t1 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_s = time.perf_counter() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics.update(
        train_loss=out.training_loss, train_seconds=round(train_s, 2),
        global_step=trainer.state.global_step,
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        real_tokens_per_second=round(data.stats["real_tokens"] * recipe.num_epochs / train_s, 1)
        if recipe.max_steps <= 0 else None,
    )
    if data.eval is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev.get("eval_loss")
        if "perplexity" in recipe.eval_metrics and ev.get("eval_loss") is not None:
            metrics["perplexity"] = math.exp(min(ev["eval_loss"], 50))
    if wants_gen and data.eval_examples:
        metrics["after"] = evaluate_generation(pm, spec, model, tokenizer, data.eval_examples,
                                               recipe.eval_metrics, gen_cfg.max_new_tokens,
                                               processor=loaded.processor)
        say(f"plugtune: after training: {metrics['after']}")
    out_dir = Path(recipe.output_dir)
    from plugtune.scale import gathered_state_dict

    save_run(out_dir, model, tokenizer, user_recipe, spec, metrics, trainer.state.log_history, data.stats,
             state_dict=gathered_state_dict(trainer), processor=loaded.processor)
    say(f"plugtune: run saved to {out_dir}")
    return RunResult(output_dir=out_dir, metrics=metrics, log_history=trainer.state.log_history)
