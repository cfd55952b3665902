"""Reward models (Bradley-Terry, as in Ouyang et al. 2022, arXiv:2203.02155) through TRL's
``RewardTrainer``: ``rl: reward`` or ``reward_model: true``.

The base is loaded as ``AutoModelForSequenceClassification`` with one output (a fresh linear
``score`` head on the last token); LoRA wraps it with peft's ``SEQ_CLS`` task (the head is
trained in full, as ``modules_to_save``), or every weight trains (``adapter: none``). Pairs are
tokenized by :mod:`plugtune.data.preference` (the same text DPO sees): ``chosen_ids`` /
``rejected_ids`` are ``prompt + answer``. Before and after training the run measures pairwise
accuracy (share of held-out pairs whose chosen answer scores higher) and the mean margin
(chosen minus rejected score); ``plugtune eval RUN`` repeats it, base vs trained. The run
folder is usable as a reward function of ``rl: grpo``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method


class RewardKeys(BaseModel):
    """Recipe keys of ``rl: reward``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    reward_center_coefficient: float | None = Field(
        None, ge=0, description="RewardConfig.center_rewards_coefficient: pushes the mean "
        "reward towards 0 (Eisenstein et al. 2023); unset: off")


METHOD = Method(
    name="reward",
    run="plugtune.methods.reward:run",
    data_kinds=("preference",),
    keys=RewardKeys,
    description="reward model on preference pairs (sequence classifier, TRL RewardTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


def load_reward_model(spec, tokenizer):
    """``AutoModelForSequenceClassification`` (``num_labels=1``) of ``spec.path`` with the
    recipe's dtype / quantization policy; its ``pad_token_id`` is the tokenizer's (the score is
    read at the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification

    from plugtune.modeling import load_model

    model = load_model(spec, auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def pairwise_metrics(model, rows, pad_id: int, batch_size: int = 8) -> dict:
    """Score every pair of ``rows`` (``chosen_ids`` / ``rejected_ids`` lists) with the reward
    model.

    Returns:
        ``{"pairwise_accuracy": share of pairs with chosen > rejected, "mean_margin": mean of
        chosen - rejected (score units), "pairs": n}``.
    """
    import torch

    def scores(seqs):
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: the score head reads the last real token
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        dev = next(model.parameters()).device
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float().cpu()

    was_training = model.training
    model.eval()
    margins = []
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            part = rows[k: k + batch_size]
            margins.append(scores(part["chosen_ids"]) - scores(part["rejected_ids"]))
    model.train(was_training)
    m = torch.cat(margins) if margins else torch.zeros(0)
    return {"pairwise_accuracy": round(float((m > 0).float().mean()), 4) if len(m) else None,
            "mean_margin": round(float(m.mean()), 4) if len(m) else None, "pairs": len(m)}


def reward_rows(rows):
    """Tokenized pairs -> ``chosen_ids`` / ``rejected_ids`` = prompt + answer (``length``
    kept)."""
    def fn(r):
        return {"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}

    if rows is None:
        return None
    return rows.map(fn, remove_columns=["prompt_ids"], desc="reward pairs")


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx``; ``metrics["before"]`` holds the untrained
    model's pairwise accuracy and margin on the held-out pairs (eval split, else up to 64
    training pairs)."""
    from peft import TaskType
    from trl import RewardConfig, RewardTrainer

    from plugtune.trainer import (
        CompleteCheckpointCallback,
        lora_config,
        preference_rows,
        prepare_base,
        training_kwargs,
    )

    recipe, spec, tokenizer = ctx.recipe, ctx.spec, ctx.tokenizer
    train_rows, eval_rows, stats = preference_rows(ctx)
    ctx.model = None  # the causal LM from plugtune_load: the reward model replaces it
    model = load_reward_model(spec, tokenizer)
    train_rows, eval_rows = reward_rows(train_rows), reward_rows(eval_rows)
    held_out = eval_rows if eval_rows is not None else train_rows.select(range(min(64, len(train_rows))))
    before = pairwise_metrics(model, held_out, tokenizer.pad_token_id)
    peft_config = None
    if recipe.adapter != "none":
        model = prepare_base(spec, model)
        peft_config = lora_config(spec, model, ctx.pm)
        peft_config.task_type = TaskType.SEQ_CLS
        if isinstance(peft_config.target_modules, (list, set)):
            peft_config.target_modules = sorted(set(peft_config.target_modules) - {"score"})
    kw = training_kwargs(recipe, spec, eval_rows is not None, seq2seq=False)
    kw.update(max_length=recipe.sequence_len, center_rewards_coefficient=recipe.reward_center_coefficient,
              gradient_checkpointing=recipe.gradient_checkpointing,
              gradient_checkpointing_kwargs={"use_reentrant": False},
              dataset_num_proc=recipe.dataset_num_proc)
    kw["bf16"], kw["fp16"] = bool(kw.get("bf16")), bool(kw.get("fp16"))
    trainer = RewardTrainer(model=model, args=RewardConfig(**kw), train_dataset=train_rows,
                            eval_dataset=eval_rows, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=[CompleteCheckpointCallback(ctx.say)])
    trainer._plugtune_held_out = held_out
    metrics = {"rl": "reward", "reference": "none (reward model)", "before": before}
    ctx.say(f"plugtune: reward: before training: {before}")
    return trainer, metrics, stats


def run(ctx):
    """Train the reward model and write the run directory; ``metrics`` hold ``before`` and
    ``after`` pairwise accuracy / mean margin and first/last logged ``accuracy`` / ``margin``."""
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats = build_trainer(ctx)

    def after(tr):
        metrics["after"] = pairwise_metrics(tr.model, tr._plugtune_held_out,
                                            ctx.tokenizer.pad_token_id)
        ctx.say(f"plugtune: reward: after training: {metrics['after']}")

    return fit_and_save(ctx, trainer, metrics, stats, watch=("accuracy", "margin"), after=after)


def load_reward_run(run_dir) -> tuple:
    """A reward run folder -> ``(model, tokenizer)``: the sequence classifier with its adapter
    merged (or its full weights), in eval mode, for use as a GRPO / RLOO reward."""
    from peft import PeftModel

    from plugtune.modeling import load_tokenizer
    from plugtune.runs import load_run_spec

    spec, adapter, _ = load_run_spec(run_dir)
    tokenizer = load_tokenizer(spec)
    model = load_reward_model(spec, tokenizer)
    if adapter:
        model = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload()
    return model.eval().requires_grad_(False), tokenizer


def evaluate_run(run_dir, data: str | None = None, dataset_type: str | None = None,
                 max_samples: int | None = None) -> dict:
    """``plugtune eval`` for a reward run: pairwise accuracy and mean margin of the trained
    model and of the base (adapter disabled: the base weights with a fresh score head, the
    same seed as training) on the recipe's ``test_datasets`` or ``data``.

    Returns:
        ``{"base": {...}, "trained": {...}}`` (see :func:`pairwise_metrics`).

    Raises:
        plugtune.runs.RunDirError: not a run folder; ValueError: no held-out pairs.
    """
    import transformers
    from peft import PeftModel

    from plugtune.data.preference import held_out_pairs
    from plugtune.modeling import load_tokenizer
    from plugtune.runs import load_run_spec

    spec, adapter, _ = load_run_spec(run_dir)
    recipe = spec.recipe
    tokenizer = load_tokenizer(spec)
    rows = held_out_pairs(recipe, tokenizer, spec.task, data, dataset_type, max_samples)
    rows = reward_rows(rows)
    transformers.set_seed(recipe.seed)
    if adapter:
        base_spec = spec.replace(recipe=recipe)
        model = PeftModel.from_pretrained(load_reward_model(base_spec, tokenizer), str(run_dir))
        trained = pairwise_metrics(model, rows, tokenizer.pad_token_id)
        with model.disable_adapter():
            base = pairwise_metrics(model, rows, tokenizer.pad_token_id)
        return {"base": base, "trained": trained}
    model = load_reward_model(spec, tokenizer)
    return {"trained": pairwise_metrics(model, rows, tokenizer.pad_token_id)}
