"""Supervised fine-tuning (and causal-LM / seq2seq / vision training): ``transformers.Trainer``
(``Seq2SeqTrainer`` for encoder-decoder families) whose ``compute_loss`` calls the family's
``plugtune_train_step`` hook. The method of every recipe without ``rl:`` and non-preference
data."""

from __future__ import annotations

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method

METHOD = Method(
    name="sft",
    run="plugtune.methods.sft:run",
    aliases=("causal_lm",),
    data_kinds=("chat", "text", "seq2seq", "vision"),
    description="supervised fine-tuning: token cross-entropy on the answers (or all text)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


def run(ctx):
    """Train with the family's loss and write the run directory.

    Evaluates generation before (``eval_before_training``) and after training when the recipe
    asks for ``exact_match`` / ``rouge``, and ``eval_loss`` / ``perplexity`` on the eval split.

    Returns:
        :class:`plugtune.trainer.RunResult` with ``train_loss``, ``global_step``,
        ``first_logged_loss``, ``last_logged_loss``, ``real_tokens_per_second``,
        ``tokens_seen``, ``peak_memory_mib``, ``wall_seconds`` ... (never ``None``)

    Raises:
        plugtune.trainer.TrainingError: non-finite loss (names the step), nothing to resume.
    """
    import json
    import math
    import time
    from pathlib import Path
    from typing import Any

    from plugtune.evaluate import evaluate_generation
    from plugtune.modeling import new_tokens
    from plugtune.observe import run_metrics, without_nulls
    from plugtune.run_control import fix_train_loss_entry, whole_run_loss
    from plugtune.rundir import save_run, update_reports
    from plugtune.scale import gathered_state_dict
    from plugtune.trainer import (
        CompleteCheckpointCallback,
        PlugtuneSeq2SeqTrainer,
        PlugtuneTrainer,
        RunResult,
        adapter_targets,
        apply_adapter,
        attach,
        count_parameters,
        training_arguments,
    )
    from plugtune.trainer_options import loraplus_optimizers

    recipe, spec, pm, data, tokenizer = ctx.recipe, ctx.spec, ctx.pm, ctx.data, ctx.tokenizer
    model = ctx.model
    added = new_tokens(model, tokenizer, data.added_tokens)  # + special_tokens the recipe added
    if added:
        model.resize_token_embeddings(len(tokenizer))
    token_rows: list[int] = []
    if recipe.adapter != "none" and spec.task == "causal":
        from plugtune.token_rows import rows_to_train

        token_rows, notice = rows_to_train(
            model, tokenizer, added, data.template.stop_token_ids if data.template else [],
            data.train.select(range(min(4, len(data.train)))), recipe.train_token_rows)
        if notice:
            ctx.say(f"plugtune: {notice}")
    prep_s = time.perf_counter() - ctx.started
    ctx.say(f"plugtune: data: {json.dumps({k: v for k, v in data.stats.items() if k not in ('per_dataset', 'eval')})}")

    metrics: dict[str, Any] = {"data_prep_seconds": round(prep_s, 2)}
    gen_cfg = recipe.generation
    wants_gen = any(m in recipe.eval_metrics for m in ("exact_match", "rouge"))
    if recipe.eval_before_training and wants_gen and data.eval_examples:
        metrics["before"] = evaluate_generation(pm, spec, model, tokenizer, data.eval_examples,
                                                recipe.eval_metrics, gen_cfg.max_new_tokens,
                                                processor=ctx.processor)
        ctx.say(f"plugtune: before training: {metrics['before']}")

    model = apply_adapter(spec, model, pm, token_rows)
    trainable, total = count_parameters(model)
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_share=round(trainable / max(total, 1), 6))
    ctx.say(f"plugtune: trainable parameters: {trainable:,} / {total:,} "
            f"({100 * trainable / max(total, 1):.3f}%){adapter_targets(model)}")

    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tokenizer, processor=ctx.processor)
    seq2seq = spec.task == "seq2seq"
    args = training_arguments(recipe, spec, data.eval is not None, seq2seq)
    if getattr(args, "use_liger_kernel", False):  # Liger's fused head replaces plugtune's
        from plugtune.modeling import disable_label_only_head

        disable_label_only_head(model)
        ctx.say(f"plugtune: Liger kernels on ({args.liger_kernel_config or 'Liger defaults'})")
    trainer_cls = PlugtuneSeq2SeqTrainer if seq2seq else PlugtuneTrainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=collate, processing_class=tokenizer,
        callbacks=[CompleteCheckpointCallback(ctx.say)], plugin_manager=pm, spec=spec,
        optimizers=loraplus_optimizers(recipe, model, args))
    if (recipe.fsdp and not getattr(trainer, "is_fsdp_enabled", False)
            and trainer.accelerator.num_processes > 1):
        ctx.say(f"plugtune: fsdp: {recipe.fsdp} is not applied: accelerate shards with FSDP only on "
                f"GPUs (here: {trainer.accelerator.distributed_type}); training unsharded (DDP)")
    ckpt = ctx.resume_checkpoint()
    observer = attach(trainer)  # tokens/s + peak memory at each logging step
    t1 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_s = time.perf_counter() - t1
    run_loss = whole_run_loss(trainer.state.log_history)  # every step, also after a resume
    fix_train_loss_entry(trainer.state.log_history, run_loss)
    metrics.update(
        train_loss=run_loss if run_loss is not None else out.training_loss,
        train_seconds=round(train_s, 2),
        global_step=trainer.state.global_step,
    )
    # real tokens counted batch by batch (also under max_steps, which stops mid-epoch)
    metrics.update(run_metrics(observer, trainer.state.log_history, ctx.started))
    metrics = without_nulls(metrics)
    out_dir = Path(recipe.output_dir)
    writer = trainer.is_world_process_zero()  # one writer, not one per rank
    state_dict = gathered_state_dict(trainer)  # a collective under ZeRO-3 / FSDP: every rank
    if writer:  # saved before any evaluation: an evaluation that fails loses no training
        save_run(out_dir, model, tokenizer, ctx.user_recipe, spec, metrics, trainer.state.log_history,
                 data.stats, state_dict=state_dict, processor=ctx.processor)
        ctx.say(f"plugtune: run saved to {out_dir}")
    trainer.accelerator.wait_for_everyone()  # no rank returns before the run folder exists
    evaluated = False
    if data.eval is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev.get("eval_loss")
        if "perplexity" in recipe.eval_metrics and ev.get("eval_loss") is not None:
            metrics["perplexity"] = math.exp(min(ev["eval_loss"], 50))
        evaluated = True
    if wants_gen and data.eval_examples:
        metrics["after"] = evaluate_generation(pm, spec, model, tokenizer, data.eval_examples,
                                               recipe.eval_metrics, gen_cfg.max_new_tokens,
                                               processor=ctx.processor)
        ctx.say(f"plugtune: after training: {metrics['after']}")
        evaluated = True
    if evaluated:
        metrics["wall_seconds"] = round(time.perf_counter() - ctx.started, 2)
        metrics = without_nulls(metrics)
    if evaluated and writer:
        update_reports(out_dir, ctx.user_recipe, spec, metrics, trainer.state.log_history, data.stats)
    return RunResult(output_dir=out_dir, metrics=metrics, log_history=trainer.state.log_history)
