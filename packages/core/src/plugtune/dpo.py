"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) through TRL's
``DPOTrainer``.

A recipe with ``rl: dpo`` (or preference data) lands here from :func:`plugtune.train.train`.
The canonical preference example is ``{"prompt": [messages], "chosen": str, "rejected": str}``
(:func:`plugtune.data.formats.preference`). plugtune tokenizes the pairs itself, with the same
rendering as SFT (:func:`plugtune.data.tokenize.render_segments`), and hands TRL pre-tokenized
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``:

* the chat template is applied once, to ``prompt + [assistant answer]``; the answer is the text
  the template adds after the generation prompt, ending with the template's stop token (EOS is
  appended when the template emits none), exactly as in SFT;
* ``prompt + answer`` is tokenized as one text (so the tokens are those the model sees at
  inference) and split where it stops agreeing with the tokenized prompt; the split is the same
  for chosen and rejected (the shorter common prefix of both), so ``prompt_ids`` is shared;
* exactly one BOS starts each sequence (only when the tokenizer adds one and the template does
  not already); chosen and rejected never start with a BOS of their own;
* the length policy cuts the prompt from the left (keeping the BOS) down to at least half of
  ``sequence_len``, then cuts the answers from the right.

The reference model: with LoRA/QLoRA it is the base with the adapter disabled (TRL gets a
``peft_config``, no second copy of the weights); for full fine-tuning an explicit frozen deep
copy of the initial model. TRL's ``DPOConfig`` defaults (bf16 on, gradient checkpointing on,
lr 1e-6) are overridden by the recipe: on CPUs bf16 is ~22x slower than fp32 (FINDINGS.md).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from trl import DPOConfig, DPOTrainer

from plugtune.config import Recipe
from plugtune.data.loading import DataError
from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import (
    TemplateInfo,
    TemplateRenderError,
    probe_template,
    render_segments,
)
from plugtune.spec import ModelSpec

log = logging.getLogger(__name__)

#: TRL 1.16 ``DPOConfig.loss_type`` values.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def render_pair(tokenizer, info: TemplateInfo, prompt: list[dict], answer: str) -> tuple[str, str]:
    """Render ``prompt + [assistant answer]`` once and split it into ``(prompt_text, answer_text)``.

    ``prompt_text`` ends with the generation prompt (e.g. ``<|assistant|>\\n``); ``answer_text``
    ends with the stop token (EOS or end-of-turn). Whitespace the template writes after the stop
    token is dropped (nothing after the stop token is scored).

    Raises:
        TemplateRenderError: the template is not prefix-stable, or the prompt ends with an
            assistant turn.
    """
    if not prompt or prompt[-1]["role"] == "assistant":
        raise TemplateRenderError("a preference prompt must end with a user (or system) turn")
    segs = render_segments(tokenizer, [*prompt, {"role": "assistant", "content": answer}], info)
    last = max(i for i, (_, trainable) in enumerate(segs) if trainable)
    return "".join(s for s, _ in segs[:last]), segs[last][0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, info: TemplateInfo, prompt: list[dict], chosen: str, rejected: str,
                  max_len: int) -> dict:
    """One preference pair -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints).

    ``prompt_ids + chosen_ids`` is the tokenization of the rendered ``prompt + chosen`` text
    (likewise for rejected), with one BOS in front when :attr:`TemplateInfo.add_bos`.

    Returns:
        The three id lists, ``length`` (prompt + longer answer, in tokens), ``status``
        (``"kept"`` / ``"truncated"``) and ``boundary_shift`` (prompt tokens that merged into the
        answers at the boundary; usually 0).
    """
    p_text, c_text = render_pair(tokenizer, info, prompt, chosen)
    p_text2, r_text = render_pair(tokenizer, info, prompt, rejected)
    if p_text != p_text2:  # cannot happen with a deterministic template; guard the invariant
        raise TemplateRenderError("the chat template renders the same prompt differently")
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, pc_ids, pr_ids = enc(p_text), enc(p_text + c_text), enc(p_text + r_text)
    n = min(_common_prefix(p_ids, pc_ids), _common_prefix(p_ids, pr_ids))
    prompt_ids, chosen_ids, rejected_ids = pc_ids[:n], pc_ids[n:], pr_ids[n:]
    keep = 0
    if info.add_bos and info.bos_id is not None:
        prompt_ids = [info.bos_id, *prompt_ids]
        keep = 1
    status = "kept"
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest > max_len:
        status = "truncated"
        room = max(max_len - longest, min(len(prompt_ids), max_len // 2))
        if len(prompt_ids) > room:  # cut the prompt from the left, keep the BOS
            prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - (room - keep):]
        budget = max(1, max_len - len(prompt_ids))
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)),
            "status": status, "boundary_shift": len(p_ids) - n}


def tokenize_preferences(ds: datasets.Dataset, tokenizer, info: TemplateInfo, max_len: int
                         ) -> tuple[datasets.Dataset, dict]:
    """Tokenize canonical preference examples (see :func:`tokenize_pair`) with ``datasets.map``.

    Returns:
        ``(rows, stats)``; rows carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
        ``length``; stats count ``pairs``, ``truncated``, ``boundary_shifted`` and mean lengths.

    Raises:
        DataError: a pair whose chosen and rejected answers are identical, or a template that
            cannot be split (record index named).
    """
    def fn(ex: dict, idx: int) -> dict:
        if ex["chosen"] == ex["rejected"]:
            raise DataError(f"preference record {idx}: chosen and rejected are identical")
        try:
            return tokenize_pair(tokenizer, info, ex["prompt"], ex["chosen"], ex["rejected"], max_len)
        except TemplateRenderError as exc:
            raise DataError(f"preference record {idx}: {exc}") from exc

    rows = ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc="tokenize pairs")
    status = rows["status"]
    n = max(len(rows), 1)
    stats = {
        "pairs": len(rows),
        "truncated": status.count("truncated"),
        "boundary_shifted": sum(1 for b in rows["boundary_shift"] if b),
        "mean_prompt_tokens": round(sum(map(len, rows["prompt_ids"])) / n, 1),
        "mean_chosen_tokens": round(sum(map(len, rows["chosen_ids"])) / n, 1),
        "mean_rejected_tokens": round(sum(map(len, rows["rejected_ids"])) / n, 1),
    }
    return rows.remove_columns(["status", "boundary_shift"]), stats


class PlugtuneDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` that takes plugtune's pre-tokenized pairs as they are and stops with
    :class:`plugtune.train.TrainingError` (naming the step) when the loss turns NaN/inf."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        cols = getattr(dataset, "column_names", None) or []
        if "prompt_ids" in cols and "chosen_ids" in cols:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "length"}
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training and not torch.isfinite(loss.detach()).all():
            from plugtune.train import TrainingError

            raise TrainingError(
                f"DPO loss became {loss.item()} at step {self.state.global_step + 1}; stopping. "
                "Lower learning_rate or dpo_beta, use bf16/fp32 instead of fp16. The last complete "
                f"checkpoint in {self.args.output_dir} is intact.")
        return out


def dpo_config(recipe: Recipe, spec: ModelSpec, has_eval: bool) -> DPOConfig:
    """``trl.DPOConfig`` from the recipe (same Trainer arguments as SFT plus ``dpo_beta``,
    ``dpo_loss_type``; ``max_length = sequence_len``; precision and gradient checkpointing from
    the recipe, not TRL's defaults).

    Raises:
        plugtune.config.RecipeError: an unknown ``dpo_loss_type``.
    """
    from plugtune.config import RecipeError
    from plugtune.train import training_kwargs

    losses = [x.strip() for x in recipe.dpo_loss_type.split(",") if x.strip()]
    unknown = [x for x in losses if x not in LOSS_TYPES]
    if unknown or not losses:
        raise RecipeError(f"dpo_loss_type: unknown loss {unknown or recipe.dpo_loss_type!r}; "
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


def train_dpo(recipe: Recipe, spec: ModelSpec, pm, model, tokenizer, data, resume: bool = False,
              console=None):
    """Run DPO on preference data and write the run directory (same layout as SFT).

    Args:
        recipe, spec, pm: the validated recipe, resolved model spec and plugin manager.
        model, tokenizer: from ``plugtune_load`` (not yet wrapped with an adapter).
        data: :class:`plugtune.data.PreparedData` of kind ``"preference"`` (canonical pairs).
        resume: the checkpoint to continue from (chosen by :func:`plugtune.train.train`), or
            ``True`` for the newest complete checkpoint of this run in ``recipe.output_dir``.

    Returns:
        :class:`plugtune.train.RunResult`; ``metrics`` holds ``train_loss``, ``global_step``,
        first/last logged ``rewards/accuracies`` and ``rewards/margins``.

    Raises:
        TrainingError: ``rl: dpo`` without preference data, non-finite loss, nothing to resume.
        DataError: bad pairs (identical answers, unsplittable template).
    """
    from plugtune.train import (
        CompleteCheckpointCallback,
        RunResult,
        TrainingError,
        count_parameters,
        last_complete_checkpoint,
        lora_config,
        prepare_base,
        save_run,
    )

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)
        else:
            log.info(msg)

    if data.kind != "preference":
        raise TrainingError(
            f"rl: dpo needs preference data (datasets of type: preference with prompt/chosen/"
            f"rejected pairs); the recipe's datasets are of kind {data.kind!r}")
    if spec.task != "causal":
        raise TrainingError(f"DPO supports decoder-only (causal) families; {spec.family.name!r} "
                            f"is {spec.task}")
    added = ensure_chat_template(tokenizer, recipe.chat_template)
    if added:
        model.resize_token_embeddings(len(tokenizer))
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
        peft_config = lora_config(spec, model, pm)
        reference = "base model with the adapter disabled"
    args = dpo_config(recipe, spec, eval_rows is not None)
    trainer = PlugtuneDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=train_rows,
        eval_dataset=eval_rows, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[CompleteCheckpointCallback(spec, say)])
    trainable, total = count_parameters(trainer.model)
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_share=round(trainable / max(total, 1), 6), reference=reference)
    say(f"plugtune: dpo: beta={recipe.dpo_beta} loss={recipe.dpo_loss_type} reference: {reference}; "
        f"trainable parameters: {trainable:,} / {total:,}")
    ckpt = resume if isinstance(resume, str | Path) else None  # chosen by train()
    if resume is True:
        ckpt = last_complete_checkpoint(recipe.output_dir, spec.extra.get("run_record", {}).get("identity"))
        if ckpt is None:
            raise TrainingError(f"--resume: no complete checkpoint in {recipe.output_dir}")
    if ckpt:
        say(f"plugtune: resuming from {ckpt}")
    t1 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    hist = trainer.state.log_history
    acc0, acc1 = _first_last(hist, "rewards/accuracies")
    mar0, mar1 = _first_last(hist, "rewards/margins")
    metrics.update(train_loss=out.training_loss, train_seconds=round(time.perf_counter() - t1, 2),
                   global_step=trainer.state.global_step,
                   first_rewards_accuracies=acc0, last_rewards_accuracies=acc1,
                   first_rewards_margins=mar0, last_rewards_margins=mar1)
    if eval_rows is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if k.startswith("eval_")})
        if ev.get("eval_loss") is not None:
            metrics["eval_loss"] = ev["eval_loss"]
    out_dir = Path(recipe.output_dir)
    from plugtune.scale import gathered_state_dict

    save_run(out_dir, trainer.model, tokenizer, recipe, spec, metrics, hist, stats,
             state_dict=gathered_state_dict(trainer))
    say(f"plugtune: dpo: rewards/accuracies {acc0} -> {acc1}, margins {mar0} -> {mar1}; "
        f"run saved to {out_dir}")
    if metrics.get("eval_loss") is not None and not math.isfinite(metrics["eval_loss"]):
        log.warning("eval loss is not finite: %s", metrics["eval_loss"])
    return RunResult(output_dir=out_dir, metrics=metrics, log_history=hist)
