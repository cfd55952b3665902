"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306) through TRL's
``KTOTrainer``: ``rl: kto``.

Data: unpaired rows ``{"prompt": [messages], "completion": str, "label": bool}`` (dataset kind
``"kto"``; LLaMA-Factory's ``kto_en_demo.json``: messages + bool ``label``) or preference pairs,
which are unpaired here (chosen -> desirable, rejected -> undesirable, as TRL does). Tokenized by
:func:`plugtune.data.preference.tokenize_unpaired` (one BOS, exact prompt boundary, completion
ending on the stop token). The reference is the base with the adapter disabled (LoRA/QLoRA) or a
frozen copy (full fine-tuning). TRL's KL estimate pairs each prompt with its batch neighbour's
completion, so batches are sequential and need ``micro_batch_size >= 2``.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method


class KTOKeys(BaseModel):
    """Recipe keys of ``rl: kto`` (TRL ``KTOConfig`` names with a ``kto_`` prefix)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kto_beta: float = Field(0.1, gt=0, description="KTOConfig.beta")
    kto_loss_type: str = Field("kto", pattern="^(kto|apo_zero_unpaired)$",
                               description="KTOConfig.loss_type: kto or apo_zero_unpaired")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTOConfig.desirable_weight")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTOConfig.undesirable_weight")


METHOD = Method(
    name="kto",
    run="plugtune.methods.kto:run",
    data_kinds=("kto", "preference"),
    keys=KTOKeys,
    description="KTO on unpaired desirable/undesirable completions (TRL KTOTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


@functools.cache
def kto_trainer_class():
    """``trl.KTOTrainer`` that takes plugtune's tokenized rows as they are (only TRL's KL
    completions are added) and stops on a NaN/inf loss naming the step."""
    from trl import KTOTrainer

    from plugtune.trainer import stop_on_nonfinite

    class PlugtuneKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "completion_ids" not in (getattr(dataset, "column_names", None) or []):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if self.calculate_KL:  # as TRL: rotate completions by one within each batch
                def add_kl(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                dataset = dataset.map(add_kl, batched=True,
                                      batch_size=args.per_device_train_batch_size)
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "length"}
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            stop_on_nonfinite(self, out[0] if return_outputs else out, "KTO")
            return out

    return PlugtuneKTOTrainer


def unpair(ds):
    """Preference pairs -> unpaired rows: chosen with ``label=True``, rejected with ``False``
    (interleaved, so every batch holds both)."""
    import datasets

    rows = []
    for ex in ds:
        rows.append({"prompt": ex["prompt"], "completion": ex["chosen"], "label": True})
        rows.append({"prompt": ex["prompt"], "completion": ex["rejected"], "label": False})
    return datasets.Dataset.from_list(rows)


def kto_config(recipe, spec, has_eval: bool):
    """``trl.KTOConfig`` from the recipe (Trainer arguments as SFT, the ``kto_*`` keys,
    ``max_length = sequence_len``, sequential batches, precision from the recipe).

    Raises:
        plugtune.config.RecipeError: ``micro_batch_size`` below 2 (the KL estimate needs a
            neighbour in the batch).
    """
    from trl import KTOConfig

    from plugtune.config import RecipeError
    from plugtune.trainer import training_kwargs

    if recipe.kto_loss_type == "kto" and recipe.micro_batch_size < 2:
        raise RecipeError("rl: kto needs micro_batch_size >= 2 (its KL estimate pairs each "
                          "prompt with another row's completion in the same batch)")
    kw = training_kwargs(recipe, spec, has_eval, seq2seq=False)
    kw.update(beta=recipe.kto_beta, loss_type=recipe.kto_loss_type,
              desirable_weight=recipe.kto_desirable_weight,
              undesirable_weight=recipe.kto_undesirable_weight, max_length=recipe.sequence_len,
              gradient_checkpointing=recipe.gradient_checkpointing,
              gradient_checkpointing_kwargs={"use_reentrant": False},
              train_sampling_strategy="sequential", dataset_num_proc=recipe.dataset_num_proc)
    kw["bf16"], kw["fp16"] = bool(kw.get("bf16")), bool(kw.get("fp16"))
    return KTOConfig(**kw)


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx`` (:class:`plugtune.trainer.MethodContext`)."""
    from plugtune.trainer import CompleteCheckpointCallback, policy_and_reference, preference_rows

    recipe, data = ctx.recipe, ctx.data
    if data.kind == "preference":
        data.raw_train = unpair(data.raw_train)
        if data.raw_eval is not None:
            data.raw_eval = unpair(data.raw_eval)
        data.kind = "kto"
    train_rows, eval_rows, stats = preference_rows(ctx)
    model, ref_model, peft_config, reference = policy_and_reference(ctx)
    args = kto_config(recipe, ctx.spec, eval_rows is not None)
    trainer = kto_trainer_class()(
        model=model, ref_model=ref_model, args=args, train_dataset=train_rows,
        eval_dataset=eval_rows, processing_class=ctx.tokenizer, peft_config=peft_config,
        callbacks=[CompleteCheckpointCallback(ctx.say)])
    metrics = {"rl": "kto", "kto_beta": recipe.kto_beta, "reference": reference}
    return trainer, metrics, stats


def run(ctx):
    """Run KTO and write the run directory; metrics hold first/last ``rewards/margins`` (mean
    implicit reward of desirable minus undesirable completions) and ``kl``."""
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats = build_trainer(ctx)
    return fit_and_save(ctx, trainer, metrics, stats, watch=("rewards/margins", "kl"))
