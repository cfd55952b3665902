"""Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691) through
``trl.experimental.orpo.ORPOTrainer``: ``rl: orpo``.

One stage from the base model: the SFT loss on the chosen answer plus ``orpo_alpha`` (TRL's
``beta``, the paper's lambda) times the log odds-ratio loss; no reference model. Pairs are
tokenized by :mod:`plugtune.data.preference` (shared with DPO) and handed to TRL in its own
row layout (:func:`plugtune.data.preference.legacy_pair_row`), so TRL does not re-tokenize.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method


class ORPOKeys(BaseModel):
    """Recipe keys of ``rl: orpo`` (axolotl's name)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    orpo_alpha: float = Field(0.1, gt=0, description="weight of the odds-ratio loss (TRL "
                              "ORPOConfig.beta, the paper's lambda)")


METHOD = Method(
    name="orpo",
    run="plugtune.methods.orpo:run",
    data_kinds=("preference",),
    keys=ORPOKeys,
    description="ORPO: SFT + odds-ratio preference loss, no reference model (TRL experimental)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


@functools.cache
def legacy_pair_trainer(which: str):
    """A subclass of TRL's experimental ``ORPOTrainer`` (``which="orpo"``) or ``CPOTrainer``
    (``"cpo"``) that takes rows already in its layout (``prompt_input_ids`` ...) as they are
    and stops on a NaN/inf loss naming the step."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if which == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl.experimental.cpo import CPOTrainer as Base

    from plugtune.run_control import seeded_train_sampler
    from plugtune.trainer import stop_on_nonfinite

    class PlugtunePairTrainer(Base):
        def tokenize_row(self, feature, model=None):
            if "chosen_input_ids" in feature:
                return feature
            return super().tokenize_row(feature, model)

        def _get_train_sampler(self, train_dataset=None):
            # group_by_length from a seeded generator: a resumed run replays the epoch's order
            return (seeded_train_sampler(self, train_dataset)
                    or super()._get_train_sampler(train_dataset))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            stop_on_nonfinite(self, out[0] if return_outputs else out, which.upper())
            return out

    PlugtunePairTrainer.__name__ = f"Plugtune{which.upper()}Trainer"
    return PlugtunePairTrainer


def legacy_rows(rows):
    """Tokenized pairs -> TRL's legacy pair-trainer layout (``None`` stays ``None``)."""
    from plugtune.data.preference import legacy_pair_row

    if rows is None:
        return None
    drop = [c for c in rows.column_names if c != "length"]  # length: for group_by_length
    return rows.map(legacy_pair_row, remove_columns=drop, desc="pair layout")


def pair_config_kwargs(recipe, spec, has_eval: bool) -> dict:
    """Trainer arguments as SFT plus what the legacy pair trainers need (lengths, precision and
    gradient checkpointing from the recipe, not TRL's defaults)."""
    from plugtune.trainer import training_kwargs

    kw = training_kwargs(recipe, spec, has_eval, seq2seq=False)
    kw.update(max_length=recipe.sequence_len, max_completion_length=recipe.sequence_len,
              gradient_checkpointing=recipe.gradient_checkpointing,
              gradient_checkpointing_kwargs={"use_reentrant": False},
              dataset_num_proc=recipe.dataset_num_proc)
    kw["bf16"], kw["fp16"] = bool(kw.get("bf16")), bool(kw.get("fp16"))
    return kw


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx`` (:class:`plugtune.trainer.MethodContext`)."""
    from trl.experimental.orpo import ORPOConfig

    from plugtune.trainer import CompleteCheckpointCallback, policy_and_reference, preference_rows

    recipe = ctx.recipe
    train_rows, eval_rows, stats = preference_rows(ctx)
    model, _, peft_config, reference = policy_and_reference(ctx, needs_reference=False)
    args = ORPOConfig(beta=recipe.orpo_alpha,
                      **pair_config_kwargs(recipe, ctx.spec, eval_rows is not None))
    trainer = legacy_pair_trainer("orpo")(
        model=model, args=args, train_dataset=legacy_rows(train_rows),
        eval_dataset=legacy_rows(eval_rows), processing_class=ctx.tokenizer,
        peft_config=peft_config, callbacks=[CompleteCheckpointCallback(ctx.say)])
    metrics = {"rl": "orpo", "orpo_alpha": recipe.orpo_alpha, "reference": reference}
    return trainer, metrics, stats


def run(ctx):
    """Run ORPO and write the run directory; metrics hold first/last ``rewards/accuracies``
    and ``rewards/margins`` (TRL's log-probability rewards of chosen vs rejected)."""
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats = build_trainer(ctx)
    return fit_and_save(ctx, trainer, metrics, stats,
                        watch=("rewards/accuracies", "rewards/margins"))
