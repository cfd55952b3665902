"""Full fine-tuning vs LoRA for a tiny FLAN-T5-shaped model on real SAMSum dialogues.

Every run goes through the real CLI (``plugtune train`` with the bundled FLAN-T5 recipes, then
``plugtune eval RUN_DIR --data test.json``), each in its own process so the peak resident memory
(``ru_maxrss`` from ``os.wait4``) is that run's alone. Step times are measured separately, in one
process, with the same Trainer the runs use and the methods interleaved round-robin, so load from
other processes on a shared machine hits every method alike (median seconds per optimizer step,
first step of each burst excluded). Prints a Markdown table and writes it, with the raw numbers,
to ``--out``.

    python packages/plugin-t5/scripts/compare_full_lora.py --steps 40 --out runs/t5-compare

The model has random weights (no downloads here), so absolute losses and ROUGE are those of a
model learning from scratch for a few dozen steps: the table compares methods, not FLAN-T5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: name -> (bundled recipe, extra overrides). Learning rates suit a random-init tiny model
#: (the recipes' 5e-5 / 1e-3 are for pretrained FLAN-T5).
METHODS = {
    "full": ("flan-t5-samsum-full", ["learning_rate=3e-3"]),
    "lora q,v": ("flan-t5-samsum-lora", ["learning_rate=1e-2", "load_in_8bit=false"]),
    "lora q,v 8-bit": ("flan-t5-samsum-lora", ["learning_rate=1e-2"]),
    "lora all-linear": ("flan-t5-samsum-lora", ["learning_rate=1e-2", "load_in_8bit=false",
                                                "lora_target_modules=all-linear"]),
}


def run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; return ``(exit code, wall seconds, peak RSS in MiB)`` of that process."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024  # KiB on Linux


def _recipe_cmd_overrides(args, model_dir: Path, run_dir: Path, val: Path) -> list[str]:
    return [f"base_model={model_dir}", f"output_dir={run_dir}", f"datasets.0.path={val}",
            f"datasets.0.max_samples={args.train_samples}", "test_datasets=[]",
            "eval_before_training=false", f"max_steps={args.steps}",
            f"micro_batch_size={args.batch}", f"sequence_len={args.sequence_len}",
            "logging_steps=1", "lr_scheduler=constant", "save_total_limit=1",
            f"generation.max_new_tokens={args.max_new_tokens}"]


def interleaved_step_times(args, model_dir: Path, val: Path, out: Path) -> dict[str, float]:
    """Median seconds per optimizer step for each method, measured round-robin in this process.

    Each method gets the objects ``plugtune.train.train`` builds (plugin-loaded model, adapter,
    collate, ``PlugtuneSeq2SeqTrainer``); each round runs ``trainer.train()`` for
    ``--timing-steps`` steps per method in turn, timing steps with a ``TrainerCallback``.
    """
    import statistics

    import torch
    from transformers import TrainerCallback

    from plugtune.config import load_recipe
    from plugtune.data import prepare
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import (
        PlugtuneSeq2SeqTrainer,
        apply_adapter,
        build_spec,
        training_arguments,
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, a, state, control, **kw):
            self.first = True

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if not self.first:
                self.times.append(time.perf_counter() - self.t0)
            self.first = False

    pm = get_plugin_manager()
    trainers = {}
    for name in args.methods:
        recipe_name, extra = METHODS[name]
        ov = _recipe_cmd_overrides(args, model_dir, out / "timing" / name.replace(" ", "_"), val)
        recipe = load_recipe(recipe_name, [*ov, f"max_steps={args.timing_steps}", *extra])
        spec = build_spec(recipe, pm)
        loaded = pm.hook.plugtune_load(spec=spec)
        data = prepare(spec.recipe, loaded.tokenizer, spec.task)
        model = apply_adapter(spec, loaded.model, pm)
        targs = training_arguments(spec.recipe, spec, False, True)
        targs.save_strategy = "no"
        targs.logging_strategy = "no"
        targs.disable_tqdm = True
        clock = StepClock()
        trainers[name] = (PlugtuneSeq2SeqTrainer(
            model=model, args=targs, train_dataset=data.train,
            data_collator=pm.hook.plugtune_collate(spec=spec, tokenizer=loaded.tokenizer),
            processing_class=loaded.tokenizer, callbacks=[clock], plugin_manager=pm, spec=spec),
            clock)
    for _ in range(args.timing_rounds):
        for trainer, _ in trainers.values():
            torch.manual_seed(0)
            trainer.train()
    return {name: statistics.median(clock.times) for name, (_, clock) in trainers.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/t5-compare", type=Path)
    ap.add_argument("--shared", default=None, help="../shared/data folder (default: auto)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--train-samples", type=int, default=320, help="from SAMSum val.json")
    ap.add_argument("--eval-samples", type=int, default=50, help="from SAMSum test.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sequence-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=6, help="steps per method per round")
    ap.add_argument("--timing-only", action="store_true",
                    help="re-measure step times only; reuse --out/results.json for the rest")
    args = ap.parse_args(argv)

    from plugtune.testing import load_shared_tokenizer, shared_dir
    from plugtune_t5.tiny import save_tiny_t5

    data = Path(args.shared) if args.shared else shared_dir() / "data"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-flan-t5"
    if not (args.timing_only and model_dir.is_dir()):
        save_tiny_t5(model_dir, load_shared_tokenizer("t5"), d_model=args.d_model,
                     num_layers=args.layers, d_ff=2 * args.d_model)
    val, test = data / "samsum" / "val.json", data / "samsum" / "test.json"
    rows = []
    if args.timing_only:
        rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
                if r["method"] in args.methods]
    for name in [] if args.timing_only else args.methods:
        recipe, extra = METHODS[name]
        run_dir = out / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "plugtune", "train", recipe]
        for o in [*_recipe_cmd_overrides(args, model_dir, run_dir, val), *extra]:
            cmd += ["--set", o]
        rc, wall, rss = run(cmd, out / f"{run_dir.name}.train.log")
        if rc != 0:
            print(f"{name}: training failed (exit {rc}); see {out / f'{run_dir.name}.train.log'}")
            return rc
        m = json.loads((run_dir / "metrics.json").read_text())
        hist = json.loads((run_dir / "log_history.json").read_text())
        losses = [h["loss"] for h in hist if "loss" in h]
        ecmd = [sys.executable, "-m", "plugtune", "eval", str(run_dir), "--data", str(test),
                "--max-samples", str(args.eval_samples)]
        elog = out / f"{run_dir.name}.eval.json"
        rc, _, _ = run(ecmd, elog)
        text = elog.read_text()
        ev = json.loads(text[text.index("{"):]) if rc == 0 else {}
        rows.append({
            "method": name, "trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "step_seconds": m["train_seconds"] / max(m["global_step"], 1),
            "peak_rss_mib": rss, "first_loss": losses[0], "last5_loss": sum(losses[-5:]) / len(losses[-5:]),
            "eval_loss": ev.get("eval_loss"), **{k: ev.get(k) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
            "train_wall_seconds": wall,
        })
        print(json.dumps(rows[-1]), flush=True)
    steps = interleaved_step_times(args, model_dir, val, out)
    for r in rows:
        r["median_step_seconds"] = steps[r["method"]]
    head = ("| method | trainable params | share | median s/step | peak RSS MiB | loss step 1 | loss last 5 "
            "| test loss | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f}% "
            f"| {r['median_step_seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['first_loss']:.3f} | {r['last5_loss']:.3f} "
            f"| {r['eval_loss']} | {r['rouge1']} | {r['rouge2']} | {r['rougeL']} | {r['rougeLsum']} |")
    setup = (f"tiny FLAN-T5-shaped T5 (d_model {args.d_model}, {args.layers}+{args.layers} layers, gated-GELU, "
             f"vocab 32128, real T5 tokenizer), random init; SAMSum val.json[:{args.train_samples}] train, "
             f"test.json[:{args.eval_samples}] eval; {args.steps} steps x batch {args.batch}, "
             f"sequence_len {args.sequence_len}, greedy max_new_tokens {args.max_new_tokens}; "
             f"step time: median of {args.timing_rounds} interleaved rounds x "
             f"{args.timing_steps - 1} timed steps per method; "
             f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    table = "\n".join(lines)
    (out / "table.md").write_text(setup + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print(setup)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
