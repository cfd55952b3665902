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
    from trl import DPOTrainer

    from plugtune.run_control import seeded_train_sampler
    from plugtune.trainer import stop_on_nonfinite

    class PlugtuneDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = getattr(dataset, "column_names", None) or []
            if "prompt_ids" in cols and "chosen_ids" in cols:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _get_train_sampler(self, train_dataset=None):
            # group_by_length from a seeded generator: a resumed run replays the epoch's order
            return (seeded_train_sampler(self, train_dataset)
                    or super()._get_train_sampler(train_dataset))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "length"}
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            stop_on_nonfinite(self, out[0] if return_outputs else out, "DPO")
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


def build_trainer(ctx):
    """The DPO trainer for ``ctx`` (:class:`plugtune.trainer.MethodContext`), its start metrics
    and data stats: ``(trainer, metrics, stats)``.

    Raises:
        TrainingError: a non-causal family.
        DataError: bad pairs (identical answers, unsplittable template).
    """
    from plugtune.trainer import CompleteCheckpointCallback, policy_and_reference, preference_rows

    recipe = ctx.recipe
    train_rows, eval_rows, stats = preference_rows(ctx)
    model, ref_model, peft_config, reference = policy_and_reference(ctx)
    args = dpo_config(recipe, ctx.spec, eval_rows is not None)
    trainer = dpo_trainer_class()(
        model=model, ref_model=ref_model, args=args, train_dataset=train_rows,
        eval_dataset=eval_rows, processing_class=ctx.tokenizer, peft_config=peft_config,
        callbacks=[CompleteCheckpointCallback(ctx.say)])
    metrics = {"rl": recipe.rl or "dpo", "dpo_beta": recipe.dpo_beta,
               "dpo_loss_type": ",".join(args.loss_type), "reference": reference}
    return trainer, metrics, stats


def run(ctx):
    """Run DPO on preference data and write the run directory (same layout as SFT).

    Returns:
        :class:`plugtune.trainer.RunResult`; ``metrics`` holds ``train_loss``, ``global_step``,
        first/last logged ``rewards/accuracies`` and ``rewards/margins``.
    """
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats = build_trainer(ctx)
    return fit_and_save(ctx, trainer, metrics, stats,
                        watch=("rewards/accuracies", "rewards/margins"))
