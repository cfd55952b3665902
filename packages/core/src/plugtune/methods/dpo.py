"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) through TRL's
``DPOTrainer``; ``rl: dpo`` (``rl: ipo`` selects ``dpo_loss_type: ipo``).

Preference pairs are tokenized by :mod:`plugtune.data.preference` (one BOS, exact prompt
boundary, answers ending on the stop token) and handed to TRL as ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``.

The reference model: with LoRA/QLoRA it is the base with the adapter disabled (TRL gets a
``peft_config``, no second copy of the weights); for full fine-tuning an explicit frozen deep
copy of the initial model. TRL's ``DPOConfig`` defaults (bf16 on, gradient checkpointing on,
lr 1e-6) are overridden by the recipe: on CPUs bf16 is ~22x slower than fp32 (FINDINGS.md).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method

if TYPE_CHECKING:  # pragma: no cover
    from plugtune.config import Recipe
    from plugtune.spec import ModelSpec

#: TRL 1.16 ``DPOConfig.loss_type`` values.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DPOKeys(BaseModel):
    """Recipe keys of ``rl: dpo``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dpo_beta: float = Field(0.1, gt=0, description="DPO beta (TRL DPOConfig.beta): the strength "
                            "of the implicit KL penalty to the reference model")
    dpo_loss_type: str = Field("sigmoid", description="TRL DPOConfig.loss_type: sigmoid, ipo, "
                               "hinge, ... (comma-separated to combine)")


METHOD = Method(
    name="dpo",
    run="plugtune.methods.dpo:run",
    aliases=("ipo",),
    data_kinds=("preference",),
    keys=DPOKeys,
    description="Direct Preference Optimization on prompt/chosen/rejected pairs (TRL DPOTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


@functools.cache
def dpo_trainer_class():
    """``PlugtuneDPOTrainer``: ``trl.DPOTrainer`` that takes plugtune's pre-tokenized pairs as
    they are and stops with :class:`plugtune.trainer.TrainingError` (naming the step) when the
    loss turns NaN/inf. Built on first use (keeps trl out of recipe validation)."""
    import torch
    from trl import DPOTrainer

    from plugtune.run_control import seeded_train_sampler
    from plugtune.runstate import interrupted_message
    from plugtune.trainer import TrainingError

    class PlugtuneDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = getattr(dataset, "column_names", None) or []
            if "prompt_ids" in cols and "chosen_ids" in cols:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _get_train_sampler(self, train_dataset=None):
            # group_by_length from a seeded generator: a resumed run replays the epoch's order
            return seeded_train_sampler(self, train_dataset) or super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "length"}
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            if model.training and not torch.isfinite(loss.detach()).all():
                raise TrainingError(
                    f"DPO loss became {loss.item()} at step {self.state.global_step + 1}; "
                    "stopping. Lower learning_rate or dpo_beta, use bf16/fp32 instead of fp16. "
                    f"{interrupted_message(self.args.output_dir)}")
            return out

    return PlugtuneDPOTrainer


def dpo_config(recipe: Recipe, spec: ModelSpec, has_eval: bool):
    """``trl.DPOConfig`` from the recipe (same Trainer arguments as SFT plus ``dpo_beta``,
    ``dpo_loss_type``; ``max_length = sequence_len``; precision and gradient checkpointing from
    the recipe, not TRL's defaults).

    Raises:
        plugtune.config.RecipeError: an unknown ``dpo_loss_type``.
    """
    from trl import DPOConfig

    from plugtune.config import RecipeError
    from plugtune.trainer import training_kwargs

    loss_spec = recipe.dpo_loss_type
    if recipe.rl == "ipo" and "dpo_loss_type" not in recipe.model_fields_set:
        loss_spec = "ipo"  # axolotl's rl: ipo
    losses = [x.strip() for x in loss_spec.split(",") if x.strip()]
    unknown = [x for x in losses if x not in LOSS_TYPES]
    if unknown or not losses:
        raise RecipeError(f"dpo_loss_type: unknown loss {unknown or loss_spec!r}; "
                          f"expected one of {', '.join(LOSS_TYPES)} (comma-separated to combine)")
    kw = training_kwargs(recipe, spec, has_eval, seq2seq=False)
    kw.update(
        beta=recipe.dpo_beta,
        loss_type=losses,
        max_length=recipe.sequence_len,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_num_proc=recipe.dataset_num_proc,
        precompute_ref_log_probs=False,
    )
    kw["bf16"] = bool(kw.get("bf16"))  # DPOConfig turns bf16=None into True
    kw["fp16"] = bool(kw.get("fp16"))
    return DPOConfig(**kw)


def _first_last(history: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [h[key] for h in history if key in h]
    return (vals[0], vals[-1]) if vals else (None, None)


def run(ctx):
    """Run DPO on preference data and write the run directory (same layout as SFT).

    ``ctx`` (:class:`plugtune.trainer.MethodContext`): the recipe, spec, plugin manager, the
    model and tokenizer from ``plugtune_load`` (not yet wrapped with an adapter) and the
    prepared data of kind ``"preference"`` (canonical pairs, ``data.raw_train``).

    Returns:
        :class:`plugtune.trainer.RunResult`; ``metrics`` holds ``train_loss``, ``global_step``,
        first/last logged ``rewards/accuracies`` and ``rewards/margins``.

    Raises:
        TrainingError: a non-causal family, non-finite loss, nothing to resume.
        DataError: bad pairs (identical answers, unsplittable template).
    """
    import copy
    import json
    import math
    import time
    from pathlib import Path
    from typing import Any

    from plugtune.data.preference import tokenize_preferences
    from plugtune.data.templates import ensure_chat_template
    from plugtune.data.tokenize import probe_template
    from plugtune.modeling import new_tokens
    from plugtune.run_control import fix_train_loss_entry, whole_run_loss
    from plugtune.rundir import save_run
    from plugtune.scale import gathered_state_dict
    from plugtune.trainer import (
        CompleteCheckpointCallback,
        RunResult,
        TrainingError,
        count_parameters,
        lora_config,
        prepare_base,
    )

    recipe, spec, pm, model, tokenizer, data = (ctx.recipe, ctx.spec, ctx.pm, ctx.model,
                                                ctx.tokenizer, ctx.data)
    say = ctx.say
    if spec.task != "causal":
        raise TrainingError(f"DPO supports decoder-only (causal) families; {spec.family.name!r} "
                            f"is {spec.task}")
    added = [*data.added_tokens, *ensure_chat_template(tokenizer, recipe.chat_template)]
    added = new_tokens(model, tokenizer, added)  # + special_tokens the recipe added
    if added:
        model.resize_token_embeddings(len(tokenizer))
    from plugtune.token_rows import rows_to_train

    token_rows, notice = rows_to_train(model, tokenizer, added, [], [], recipe.train_token_rows)
    if notice and recipe.adapter != "none":
        say(f"plugtune: {notice}")
    info = probe_template(tokenizer)
    t0 = time.perf_counter()
    train_rows, tstats = tokenize_preferences(data.raw_train, tokenizer, info, recipe.sequence_len)
    eval_rows = None
    if data.raw_eval is not None and len(data.raw_eval):
        eval_rows, estats = tokenize_preferences(data.raw_eval, tokenizer, info, recipe.sequence_len)
        tstats["eval"] = estats
    stats = {**data.stats, **tstats, "kind": "preference"}
    say(f"plugtune: dpo data: {json.dumps({k: v for k, v in tstats.items() if k != 'eval'})}")
    metrics: dict[str, Any] = {"data_prep_seconds": round(time.perf_counter() - t0, 2),
                               "rl": "dpo", "dpo_beta": recipe.dpo_beta,
                               "dpo_loss_type": recipe.dpo_loss_type}

    ref_model = None
    peft_config = None
    if recipe.adapter == "none":
        # full fine-tuning: an explicit frozen copy of the initial weights is the reference
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = "frozen copy of the initial model"
    else:
        if spec.quantization is not None:
            model = prepare_base(spec, model)
        peft_config = lora_config(spec, model, pm, token_rows)
        reference = "base model with the adapter disabled"
    args = dpo_config(recipe, spec, eval_rows is not None)
    trainer = dpo_trainer_class()(
        model=model, ref_model=ref_model, args=args, train_dataset=train_rows,
        eval_dataset=eval_rows, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[CompleteCheckpointCallback(say)])
    trainable, total = count_parameters(trainer.model)
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_share=round(trainable / max(total, 1), 6), reference=reference)
    say(f"plugtune: dpo: beta={recipe.dpo_beta} loss={recipe.dpo_loss_type} reference: {reference}; "
        f"trainable parameters: {trainable:,} / {total:,}")
    ckpt = ctx.resume_checkpoint()
    t1 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    hist = trainer.state.log_history
    acc0, acc1 = _first_last(hist, "rewards/accuracies")
    mar0, mar1 = _first_last(hist, "rewards/margins")
    run_loss = whole_run_loss(hist)  # every step, also after a resume
    fix_train_loss_entry(hist, run_loss)
    metrics.update(train_loss=run_loss if run_loss is not None else out.training_loss,
                   train_seconds=round(time.perf_counter() - t1, 2),
                   global_step=trainer.state.global_step,
                   first_rewards_accuracies=acc0, last_rewards_accuracies=acc1,
                   first_rewards_margins=mar0, last_rewards_margins=mar1)
    if eval_rows is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if k.startswith("eval_")})
        if ev.get("eval_loss") is not None:
            metrics["eval_loss"] = ev["eval_loss"]
    out_dir = Path(recipe.output_dir)
    save_run(out_dir, trainer.model, tokenizer, ctx.user_recipe, spec, metrics, hist, stats,
             state_dict=gathered_state_dict(trainer))
    say(f"plugtune: dpo: rewards/accuracies {acc0} -> {acc1}, margins {mar0} -> {mar1}; "
        f"run saved to {out_dir}")
    if metrics.get("eval_loss") is not None and not math.isfinite(metrics["eval_loss"]):
        logging.getLogger(__name__).warning("eval loss is not finite: %s", metrics["eval_loss"])
    return RunResult(output_dir=out_dir, metrics=metrics, log_history=hist)
