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
from pathlib import Path
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


def answer_logps(model, rows, pad_id: int, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Summed log-probability (nats) of each pair's chosen and rejected answer given its prompt.

    ``rows`` carry ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (lists of ints, from
    :func:`plugtune.data.preference.tokenize_preferences`); only answer tokens are scored, as in
    TRL's ``DPOTrainer.concatenated_forward`` (sum over the completion, ``loss_type`` sigmoid).

    Returns:
        ``(chosen_logps, rejected_logps)``, one float per pair.
    """
    import torch

    def logps(prompts, answers):
        seqs = [p + a for p, a in zip(prompts, answers)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
        tgt = labels[:, 1:].to(dev)
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        return (lp * (tgt != -100)).sum(-1).cpu().tolist()

    was_training = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            part = rows[k: k + batch_size]
            chosen += logps(part["prompt_ids"], part["chosen_ids"])
            rejected += logps(part["prompt_ids"], part["rejected_ids"])
    model.train(was_training)
    return chosen, rejected


def preference_metrics(policy: tuple[list[float], list[float]],
                       reference: tuple[list[float], list[float]], beta: float) -> dict:
    """Held-out preference metrics of a DPO policy against its reference.

    Args:
        policy / reference: ``(chosen_logps, rejected_logps)`` from :func:`answer_logps`.
        beta: the run's ``dpo_beta``.

    Returns:
        ``logp_accuracy`` (share of pairs whose chosen answer the policy finds more likely than
        the rejected one, summed log-probs), ``reward_accuracy`` and ``reward_margin`` (TRL's
        ``rewards/accuracies`` and ``rewards/margins``: implicit reward
        ``beta * (logp_policy - logp_reference)``, Rafailov et al. 2023 eq. 5; 0 for every pair
        when policy == reference, so a model's accuracy against itself is 0), ``pairs``.
    """
    pc, pr = policy
    rc, rr = reference
    n = len(pc)
    if not n:
        return {"pairs": 0, "logp_accuracy": None, "reward_accuracy": None, "reward_margin": None}
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]
    return {"pairs": n,
            "logp_accuracy": round(sum(a > b for a, b in zip(pc, pr)) / n, 4),
            "reward_accuracy": round(sum(m > 0 for m in margins) / n, 4),
            "reward_margin": round(sum(margins) / n, 4)}


def evaluate_run(run_dir, data: str | None = None, dataset_type: str | None = None,
                 max_samples: int | None = None) -> dict:
    """``plugtune eval`` for a DPO run: preference metrics of the reference (the base model, or
    the base with the adapter disabled) and of the trained policy on the recipe's
    ``test_datasets`` or ``data`` (:func:`preference_metrics`).

    Returns:
        ``{"reference": {...}, "trained": {...}, "dpo_beta": beta}``; the reference scored
        against itself has ``reward_accuracy`` 0 by definition, its ``logp_accuracy`` is the
        "before" number.

    Raises:
        plugtune.runs.RunDirError: not a run folder; ValueError: no held-out pairs.
    """
    from plugtune.data.preference import held_out_pairs
    from plugtune.runs import load_run, load_run_spec

    spec, adapter, _ = load_run_spec(run_dir)
    recipe = spec.recipe
    spec, loaded, pm = load_run(run_dir)
    tok = loaded.tokenizer
    rows = held_out_pairs(recipe, tok, spec.task, data, dataset_type, max_samples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    model = loaded.model
    trained = answer_logps(model, rows, pad)
    if adapter:
        with model.disable_adapter():
            ref = answer_logps(model, rows, pad)
    else:  # full fine-tuning: the reference is the base model the run started from
        import yaml

        from plugtune.export.portable import BaseModelMissing, resolve_base
        from plugtune.runs import RunDirError

        raw = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text())
        try:
            base = resolve_base(Path(run_dir), raw["base_model"])
        except BaseModelMissing as exc:
            raise RunDirError(str(exc)) from exc
        del model, loaded
        ref_spec = spec.replace(path=base, recipe=recipe.model_copy(update={"base_model": base}))
        ref = answer_logps(pm.hook.plugtune_load(spec=ref_spec).model, rows, pad)
    beta = recipe.dpo_beta
    return {"dpo_beta": beta, "reference": preference_metrics(ref, ref, beta),
            "trained": preference_metrics(trained, ref, beta)}
