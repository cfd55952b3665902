"""Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417) and SimPO (Meng et al.
2024, arXiv:2405.14734) through ``trl.experimental.cpo.CPOTrainer``: ``rl: cpo`` / ``rl: simpo``.

Both are reference-free. ``rl: simpo`` is CPO with ``loss_type: simpo`` (length-normalised
log-probability reward with margin ``simpo_gamma``) and, unless set, ``cpo_alpha: 0`` (no SFT
term) and ``cpo_beta: 2.0`` (the SimPO paper's range); a ``cpo_alpha`` above 0 gives CPO-SimPO.
Pairs are tokenized by :mod:`plugtune.data.preference`, as for DPO and ORPO.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method


class CPOKeys(BaseModel):
    """Recipe keys of ``rl: cpo`` / ``rl: simpo`` (TRL ``CPOConfig`` names)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cpo_beta: float | None = Field(None, gt=0, description="CPOConfig.beta (default 0.1; "
                                   "simpo: 2.0)")
    cpo_loss_type: str | None = Field(
        None, pattern="^(sigmoid|hinge|ipo|simpo|alphapo)$",
        description="CPOConfig.loss_type (default sigmoid; rl: simpo -> simpo)")
    cpo_alpha: float | None = Field(None, ge=0, description="weight of the SFT term (default 1.0; "
                                    "simpo: 0)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin")


METHOD = Method(
    name="cpo",
    run="plugtune.methods.cpo:run",
    aliases=("simpo",),
    data_kinds=("preference",),
    keys=CPOKeys,
    description="CPO / SimPO: reference-free pair losses (TRL experimental CPOTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


def cpo_settings(recipe) -> dict:
    """``beta``, ``loss_type``, ``cpo_alpha``, ``simpo_gamma`` for ``CPOConfig``, with the
    SimPO defaults when ``rl: simpo``."""
    simpo = recipe.rl == "simpo"
    loss = recipe.cpo_loss_type or ("simpo" if simpo else "sigmoid")
    return {"beta": recipe.cpo_beta or (2.0 if loss == "simpo" else 0.1), "loss_type": loss,
            "cpo_alpha": recipe.cpo_alpha if recipe.cpo_alpha is not None else (0.0 if simpo else 1.0),
            "simpo_gamma": recipe.simpo_gamma}


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx`` (:class:`plugtune.trainer.MethodContext`)."""
    from trl.experimental.cpo import CPOConfig

    from plugtune.methods.orpo import legacy_pair_trainer, legacy_rows, pair_config_kwargs
    from plugtune.trainer import CompleteCheckpointCallback, policy_and_reference, preference_rows

    recipe = ctx.recipe
    train_rows, eval_rows, stats = preference_rows(ctx)
    model, _, peft_config, reference = policy_and_reference(ctx, needs_reference=False)
    settings = cpo_settings(recipe)
    args = CPOConfig(**settings, **pair_config_kwargs(recipe, ctx.spec, eval_rows is not None))
    trainer = legacy_pair_trainer("cpo")(
        model=model, args=args, train_dataset=legacy_rows(train_rows),
        eval_dataset=legacy_rows(eval_rows), processing_class=ctx.tokenizer,
        peft_config=peft_config, callbacks=[CompleteCheckpointCallback(ctx.say)])
    metrics = {"rl": recipe.rl or "cpo", **settings, "reference": reference}
    return trainer, metrics, stats


def run(ctx):
    """Run CPO / SimPO and write the run directory; metrics hold first/last
    ``rewards/accuracies`` and ``rewards/margins``."""
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats = build_trainer(ctx)
    return fit_and_save(ctx, trainer, metrics, stats,
                        watch=("rewards/accuracies", "rewards/margins"))
