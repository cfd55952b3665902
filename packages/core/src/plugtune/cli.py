"""The ``plugtune`` command line.

    plugtune train RECIPE [--set key=value ...] [--overwrite]
    plugtune train --resume RUN_DIR [--set key=value ...]   (or: train RECIPE --resume)
    plugtune recipe convert FILE [--set ...]      an axolotl / LLaMA-Factory / TRL config as a recipe
    plugtune prepare RECIPE [--set ...]           data statistics without training
    plugtune generate RUN_DIR --prompt TEXT [--image PATH ...] [--max-new-tokens N]
                      [--system S] [--temperature T] [--top-p P]
    plugtune chat RUN_DIR [--system S] [--temperature T] [--top-p P]   multi-turn, streamed
    plugtune eval RUN_DIR [--data FILE --type T]  loss + generation metrics
    plugtune plugins [--json]
    plugtune recipes [--json] | recipes show NAME | recipes copy NAME [DIR]
    plugtune --version            plugtune's and each installed plugin's version
    plugtune merge RUN_DIR OUT_DIR [--force] [--dtype D] [--base dequantized|original]
    plugtune quantize RUN_OR_MODEL --method bnb4|bnb8|gptq --out DIR [--eval-data F --type T]
    plugtune estimate RECIPE [--device-memory 24GiB] [--num-gpus N] [--set ...]

``RECIPE`` is a path or the name of a bundled recipe (``plugtune recipes``), or an axolotl,
LLaMA-Factory or TRL config (detected from its keys, see :mod:`plugtune.config.dialects`); it
is validated before torch is imported, so a bad key is reported at once. Known errors
(bad recipe, bad data, missing plugin, non-finite loss) print one clear message and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _known_errors() -> tuple[type[BaseException], ...]:
    from plugtune.config import RecipeError
    from plugtune.data.loading import DataError
    from plugtune.data.templates import TemplateError
    from plugtune.data.tokenize import TemplateRenderError
    from plugtune.modeling import ModelLoadError
    from plugtune.plugins import PluginError
    from plugtune.runs import RunDirError
    from plugtune.runstate import RunStateError
    from plugtune.train import TrainingError

    errors = (RecipeError, DataError, TemplateError, TemplateRenderError, ModelLoadError,
              PluginError, RunDirError, RunStateError, TrainingError)
    return errors + _scale_errors()


def _scale_errors() -> tuple[type[BaseException], ...]:
    from plugtune.estimate import EstimateError
    from plugtune.merge import MergeError
    from plugtune.quantize import QuantizeError

    return (MergeError, QuantizeError, EstimateError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plugtune", description="Plugin-based instruction tuning for LLMs")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything: debug logging and the library notices plugtune hides "
                        "by default (the list: plugtune.observe.QUIET_LOGS / QUIET_WARNINGS)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or plugtune info lines: warnings, errors, the "
                        "Trainer's per-step log lines and the final summary")
    p.add_argument("--version", action=_VersionAction,
                   help="print plugtune's and each installed plugin's version")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a recipe")
    t.add_argument("recipe", nargs="?", help="recipe file or bundled recipe name (not needed "
                   "with --resume RUN_DIR: the run's own recipe is used)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted paths: datasets.0.path=...)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a run from its newest complete checkpoint: RUN_DIR (its saved "
                        "recipe is used), or RECIPE's output_dir")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds another run (its files are "
                        "removed, each named)")

    pr = sub.add_parser("prepare", help="run the data pipeline and print its statistics")
    pr.add_argument("recipe")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--show", type=int, default=1, help="print N rendered samples with labels")

    g = sub.add_parser("generate", help="generate with a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--image", action="append", default=None, help="image path (vision families)")
    g.add_argument("--system", default=None, help="system prompt (default: the recipe's)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: the recipe's generation)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (0, 1]")

    c = sub.add_parser("chat", help="multi-turn chat with a run in the terminal (streams tokens)")
    c.add_argument("run_dir")
    c.add_argument("--system", default=None, help="system prompt (default: the recipe's)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=None)

    e = sub.add_parser("eval", help="evaluate a trained run on its eval set or --data")
    e.add_argument("run_dir")
    e.add_argument("--data", help="dataset file (default: the recipe's test_datasets)")
    e.add_argument("--type", default=None, help="dataset type of --data (default: the recipe's)")
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--metrics", default=None, metavar="M[,M...]",
                   help="loss, perplexity, exact_match, rouge (default: the recipe's eval_metrics; "
                        "loss and perplexity alone skip generation)")
    e.add_argument("--columns", action="append", default=[], metavar="FIELD=COLUMN[,...]",
                   help="map --data's columns to the format's fields, e.g. "
                        "instruction=question,output=answer (default: the recipe's columns "
                        "when --type is the recipe's)")
    e.add_argument("--no-base", action="store_true",
                   help="skip the base model (adapter runs are also evaluated without the adapter)")

    pl = sub.add_parser("plugins", help="list installed plugins")
    pl.add_argument("--json", action="store_true")
    fa = sub.add_parser("families", help="model types: route (plugin or generic), quirks, "
                                         "packing exact/refused, attention, the test that shows it")
    fa.add_argument("--json", action="store_true")

    rs = sub.add_parser("recipes", help="list, show or copy the bundled example recipes")
    rs.add_argument("--json", action="store_true", help="the list as JSON")
    rs_sub = rs.add_subparsers(dest="recipes_command")
    rs_show = rs_sub.add_parser("show", help="print a bundled recipe")
    rs_show.add_argument("name")
    rs_copy = rs_sub.add_parser("copy", help="write a bundled recipe into DIR with its model and "
                                "data paths made absolute (or explained when not on this machine)")
    rs_copy.add_argument("name")
    rs_copy.add_argument("dir", nargs="?", default=".", help="target folder (default: here)")

    rc = sub.add_parser("recipe", help="work with recipes and other tools' configs")
    rc_sub = rc.add_subparsers(dest="recipe_command", required=True)
    cv = rc_sub.add_parser("convert", help="print the plugtune recipe an axolotl, LLaMA-Factory "
                           "or TRL config becomes")
    cv.add_argument("file")
    cv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    x = sub.add_parser("export", help="merged safetensors folder + GGUF (llama.cpp) + Ollama Modelfile")
    x.add_argument("run_dir")
    x.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    x.add_argument("--format", choices=["gguf", "safetensors"], default="gguf")
    x.add_argument("--outtype", default="f16", help="GGUF tensor type: f32, f16, bf16, q8_0, auto")
    x.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile")
    x.add_argument("--system", default=None, help="default system prompt of the Modelfile")
    x.add_argument("--verify", action="store_true",
                   help="read the GGUF back and report the max logit difference to the merged model")
    x.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    m = sub.add_parser("merge", help="merge a run's adapter into its base: a standalone model")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    m.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="dtype of the merged weights (default: the recipe's dtype policy)")
    m.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                   help="for adapters trained on a 4/8-bit base: merge into the dequantized "
                        "base they were trained on (default) or the original weights")

    q = sub.add_parser("quantize", help="quantize a run or model and compare it with full precision")
    q.add_argument("source", metavar="RUN_OR_MODEL")
    q.add_argument("--method", choices=["bnb4", "bnb8", "gptq"], required=True)
    q.add_argument("--out", required=True, help="folder for the quantized model and its report")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    q.add_argument("--eval-data", default=None, help="held-out file for perplexity "
                   "(default: the run's test_datasets)")
    q.add_argument("--type", default=None, help="format of --eval-data (alpaca, dolly, text, ...)")
    q.add_argument("--max-samples", type=int, default=32)
    q.add_argument("--max-new-tokens", type=int, default=32, help="tokens per prompt for speed")

    es = sub.add_parser("estimate", help="pre-flight memory estimate of a recipe")
    es.add_argument("recipe")
    es.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    es.add_argument("--device-memory", default=None, help="memory of one device, e.g. 24GiB")
    es.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="resolves dtype: auto (bf16 on cuda, fp32 on cpu); default: this machine")
    es.add_argument("--num-gpus", type=int, default=1, help="GPUs sharing ZeRO partitions")
    es.add_argument("--json", action="store_true")
    return p


def _load_announced(name: str, overrides: list[str], console: Console | None):
    """Load a recipe or another tool's config; print what was detected and its notices."""
    from plugtune.config import load_config

    recipe, tr = load_config(name, overrides)
    if tr.dialect == "plugtune" and not Path(name).is_file():  # a bundled recipe by name
        from plugtune import bundled
        from plugtune.config.loading import read_config

        bundled.check_bundled(name, read_config(name, overrides)[1])
    if tr.dialect != "plugtune" and console is not None:
        console.print(tr.summary(name), markup=False, highlight=False)
        for note in tr.notices:
            console.print(f"  note: {note}", markup=False, highlight=False)
    return recipe, tr


def train_recipe(args, console: Console | None = None):
    """The recipe of ``plugtune train`` and whether it resumes; checks the folder for
    ``--resume`` without importing torch (nothing to resume fails before any model loads).

    Raises:
        RecipeError: no recipe and no ``--resume RUN_DIR``; an invalid recipe/override.
        RunStateError: nothing of this run to resume.
        RunAlreadyComplete: the checkpoint to resume already reached the run's end.
    """
    from plugtune.config import RecipeError
    from plugtune.runstate import (
        RunAlreadyComplete,
        completed_message,
        recipe_from_run,
        run_record,
        select_checkpoint,
    )

    resume = args.resume
    if isinstance(resume, str):
        if args.recipe:
            raise RecipeError("give either RECIPE --resume or --resume RUN_DIR, not both")
        recipe = recipe_from_run(resume, args.overrides)
    elif args.recipe:
        recipe, tr = _load_announced(args.recipe, args.overrides, console)
        resume = resume or bool(tr.resume)  # axolotl's resume_from_checkpoint, TRL's, ...
    else:
        raise RecipeError("plugtune train: give a RECIPE, or --resume RUN_DIR")
    if resume:
        ckpt = select_checkpoint(recipe.output_dir, run_record(recipe))
        if (done := completed_message(ckpt, recipe)) is not None:
            raise RunAlreadyComplete(done)
    return recipe, bool(resume)


def cmd_train(args, console: Console) -> int:
    from plugtune.runstate import RunAlreadyComplete

    try:
        recipe, resume = train_recipe(args, console)  # fast: no torch import before this check
    except RunAlreadyComplete as exc:  # nothing left to train: not an error
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return 0
    from plugtune.observe import quiet
    from plugtune.runstate import interrupted_message
    from plugtune.train import TrainingInterrupted, train

    quiet(verbose=args.verbose, quantized=recipe.quantization is not None)

    try:
        result = train(recipe, resume=resume, overwrite=args.overwrite,
                       console=Console(quiet=True) if args.quiet else console)
    except TrainingInterrupted as exc:
        Console(stderr=True).print(f"interrupted: {exc}", markup=False, highlight=False)
        return 130
    except KeyboardInterrupt:
        Console(stderr=True).print(f"aborted; {interrupted_message(recipe.output_dir)}",
                                   markup=False, highlight=False)
        return 130
    m = result.metrics
    from plugtune.observe import summary_lines

    if m.get("before") or m.get("after"):
        tab = Table(title="held-out metrics")
        tab.add_column("metric")
        tab.add_column("before")
        tab.add_column("after")
        keys = [k for k in (m.get("after") or {}) if k not in ("samples", "n")]
        for k in keys:
            tab.add_row(k, str((m.get("before") or {}).get(k, "-")), str(m["after"].get(k)))
        console.print(tab)
    for line in summary_lines(m, result.output_dir):
        console.print(line, markup=False, highlight=False)
    return 0


def cmd_recipe(args, console: Console) -> int:
    import yaml

    from plugtune.config import load_config

    _, tr = load_config(args.file, args.overrides)
    lines = [f"# plugtune recipe from the {tr.dialect} config {args.file}"]
    lines += [f"# note: {n}" for n in tr.notices]
    if tr.resume:
        lines.append("# resume: plugtune train resumes this run (--resume)")
    print("\n".join(lines))
    print(yaml.safe_dump(tr.data, sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_prepare(args, console: Console) -> int:
    from plugtune.config import load_recipe
    from plugtune.data import prepare
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    recipe = load_recipe(args.recipe, args.overrides)
    pm = get_plugin_manager()
    spec = build_spec(recipe, pm)
    from plugtune.modeling import load_tokenizer

    encode = None
    if spec.task == "vision":  # tokenized through the processor: load it (with the model)
        from plugtune.data.pipeline import hook_encoder

        loaded = pm.hook.plugtune_load(spec=spec)
        tok = loaded.tokenizer
        encode = hook_encoder(pm, spec, loaded.processor, tok)
    else:
        tok = load_tokenizer(spec)
    data = prepare(spec.recipe, tok, spec.task, encode=encode,
                   chat_rows=pm.hook.plugtune_chat_rows(spec=spec, tokenizer=tok))
    stats = {k: v for k, v in data.stats.items() if k != "per_dataset"}
    tab = Table(title=f"plugtune prepare: {args.recipe}")
    tab.add_column("statistic")
    tab.add_column("train")
    tab.add_column("eval")
    ev = stats.pop("eval", {})
    for k, v in stats.items():
        tab.add_row(k, str(v), str(ev.get(k, "")))
    console.print(tab)
    for i in range(min(args.show, len(data.train))):
        row = data.train[i]
        console.rule(f"row {i}")
        console.print(tok.decode(row["input_ids"]), markup=False)
        if spec.task == "seq2seq":  # labels are the decoder's target, not aligned with inputs
            trained = [lab for lab in row["labels"] if lab != -100]
        else:
            trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        console.rule("trained labels")
        console.print(tok.decode(trained), markup=False)
    return 0


def with_sampling(spec, temperature: float | None, top_p: float | None):
    """``spec`` with its recipe's ``generation`` updated from ``--temperature`` / ``--top-p``
    (``temperature`` 0 = greedy; any other value turns sampling on). Every plugin's
    ``plugtune_generate`` reads ``spec.recipe.generation``.

    Raises:
        SystemExit: a temperature below 0 or a top-p outside (0, 1].
    """
    import dataclasses

    if temperature is None and top_p is None:
        return spec
    if temperature is not None and temperature < 0:
        raise SystemExit(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise SystemExit(f"--top-p {top_p}: expected a value in (0, 1]")
    gen = spec.recipe.generation
    update: dict = {}
    if temperature is not None:
        update.update(do_sample=temperature > 0, temperature=temperature or gen.temperature)
    if top_p is not None:
        update["top_p"] = top_p
    recipe = spec.recipe.model_copy(update={"generation": gen.model_copy(update=update)})
    return dataclasses.replace(spec, recipe=recipe)


def cmd_generate(args, console: Console) -> int:
    from plugtune.data.formats import KINDS, with_system_prompt
    from plugtune.runs import load_run

    spec, loaded, pm = load_run(args.run_dir)
    spec = with_sampling(spec, args.temperature, args.top_p)
    n = args.max_new_tokens or spec.recipe.generation.max_new_tokens
    prompts = args.prompt
    first = spec.recipe.datasets[0] if spec.recipe.datasets else None
    system = args.system if args.system is not None else (first.system_prompt if first else None)
    if first is not None and system and spec.task != "vision":
        # the prompt as training saw it: the recipe's system turn / seq2seq task prefix
        prompts = [with_system_prompt(p, system, KINDS[first.type]) for p in prompts]
    outs = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=loaded.tokenizer,
                                     prompts=prompts, max_new_tokens=n, images=args.image,
                                     processor=loaded.processor)
    for prompt, out in zip(args.prompt, outs):
        if len(args.prompt) > 1:
            console.rule(prompt[:60])
        print(out)
    return 0


def _run_method(run_dir: str) -> str | None:
    """``"reward"`` / ``"dpo"`` for runs ``plugtune eval`` scores on preference pairs, else
    ``None`` (SFT-style evaluation)."""
    from pathlib import Path

    import yaml

    rp = Path(run_dir) / "recipe.yaml"
    if not rp.is_file():
        return None
    raw = yaml.safe_load(rp.read_text()) or {}
    if raw.get("rl") == "reward" or raw.get("reward_model"):
        return "reward"
    if raw.get("rl") in ("dpo", "ipo"):
        return "dpo"
    return None


def cmd_eval(args, console: Console) -> int:
    from plugtune.config import DatasetConfig
    from plugtune.data import prepare
    from plugtune.evaluate import evaluate_generation
    from plugtune.runs import load_run

    kind = _run_method(args.run_dir)
    if kind in ("reward", "dpo"):  # reward: pairwise accuracy; dpo: preference accuracy
        from importlib import import_module

        evaluate_run = import_module(f"plugtune.methods.{kind}").evaluate_run

        try:
            res = evaluate_run(args.run_dir, args.data, args.type, args.max_samples)
        except ValueError as exc:
            console.print(f"error: {exc}")
            return 2
        console.print_json(json.dumps(res, default=str))
        return 0
    wanted = None
    if args.metrics:
        wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in wanted if m not in ("loss", "perplexity", "exact_match", "rouge")]
        if bad or not wanted:
            console.print(f"error: --metrics {args.metrics!r}: expected a comma list of "
                          "loss, perplexity, exact_match, rouge")
            return 2
    spec, loaded, pm = load_run(args.run_dir)
    recipe = spec.recipe
    if args.data:
        first = recipe.datasets[0]
        dtype = args.type or first.type
        same = dtype == first.type  # another format: the run's columns / system turn do not apply
        columns = dict(first.columns) if same else {}
        for item in ",".join(args.columns).split(","):
            if not item.strip():
                continue
            field, sep, col = item.partition("=")
            if not sep or not field.strip() or not col.strip():
                from plugtune.config import RecipeError

                raise RecipeError(f"--columns {item!r}: expected FIELD=COLUMN, e.g. "
                                  "instruction=question")
            columns[field.strip()] = col.strip()
        test = [DatasetConfig(path=args.data, type=dtype, columns=columns,
                              system_prompt=first.system_prompt if same else None)]
    elif recipe.test_datasets:
        test = recipe.test_datasets
    else:
        console.print("error: no --data and the recipe has no test_datasets")
        return 2
    if args.max_samples:  # cut before tokenizing (not after: a big test file stays cheap)
        test = [d.model_copy(update={"max_samples": min(args.max_samples, d.max_samples or args.max_samples)})
                for d in test]
    rec = recipe.model_copy(update={"datasets": test, "test_datasets": test, "sample_packing": False,
                                    "eval_max_samples": args.max_samples or recipe.eval_max_samples})
    from plugtune.data.pipeline import hook_encoder

    encode = hook_encoder(pm, spec, loaded.processor, loaded.tokenizer) if spec.task == "vision" else None
    data = prepare(rec, loaded.tokenizer, spec.task, encode=encode,
                   chat_rows=pm.hook.plugtune_chat_rows(spec=spec, tokenizer=loaded.tokenizer))
    import math

    import torch

    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=loaded.tokenizer, processor=loaded.processor)
    rows = data.eval if data.eval is not None else data.train
    limit = min(len(rows), args.max_samples or len(rows))
    if wanted is not None:  # --metrics: generation only for exact_match / rouge
        metrics = [m for m in wanted if m in ("exact_match", "rouge")]
    else:
        metrics = [m for m in recipe.eval_metrics if m in ("exact_match", "rouge")] or ["exact_match"]
        if spec.task == "seq2seq" and "rouge" not in metrics:  # summarization: ROUGE is the metric
            metrics.append("rouge")

    def evaluate(model) -> dict:
        tot, n = 0.0, 0
        with torch.no_grad():
            for k in range(0, limit, 8):
                batch = collate([rows[i] for i in range(k, min(k + 8, limit))])
                ntok = int((batch["labels"] != -100).sum())
                loss = pm.hook.plugtune_train_step(spec=spec, model=model, batch=batch,
                                                   num_items_in_batch=None)
                tot += float(loss) * ntok
                n += ntok
        res = {"eval_loss": round(tot / max(n, 1), 4),
               "perplexity": round(math.exp(min(tot / max(n, 1), 50)), 3), "n_tokens": n}
        if not metrics:  # loss / perplexity only: no generation
            return res
        res.update(evaluate_generation(pm, spec, model, loaded.tokenizer, data.eval_examples,
                                       metrics, recipe.generation.max_new_tokens,
                                       processor=loaded.processor))
        return res

    res = evaluate(loaded.model)
    if hasattr(loaded.model, "disable_adapter") and not args.no_base:
        with loaded.model.disable_adapter():  # the base the adapter was trained on
            res["base"] = {k: v for k, v in evaluate(loaded.model).items() if k != "samples"}
        tab = Table(title=f"plugtune eval: base vs fine-tuned ({res.get('n', limit)} samples)")
        for col in ("metric", "base", "fine-tuned"):
            tab.add_column(col)
        for k, v in res.items():
            if k in ("base", "samples", "n") or isinstance(v, dict | list):
                continue
            tab.add_row(k, str(res["base"].get(k, "-")), str(v))
        Console(stderr=True).print(tab)  # stdout stays one JSON document
    console.print_json(json.dumps(res, default=str))
    return 0


def cmd_plugins(args, console: Console) -> int:
    from plugtune.plugins import describe_plugins, get_plugin_manager

    info = describe_plugins(get_plugin_manager())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tab = Table(title="plugtune plugins")
    for col in ("name", "version", "families (model types)", "methods", "hooks"):
        tab.add_column(col)
    for p in info:
        fams = "; ".join(f"{f['name']} ({', '.join(f['model_types'])})" for f in p["families"])
        tab.add_row(p["name"], str(p["version"]), fams, ", ".join(p["methods"]),
                    ", ".join(h.replace("plugtune_", "") for h in p["hooks"]))
    console.print(tab)
    return 0


def cmd_families(args, console: Console) -> int:
    from plugtune.architectures import family_rows
    from plugtune.plugins import get_plugin_manager, routing_table

    rows = family_rows(routing_table(get_plugin_manager()))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:  # a block per type: readable at any terminal width
        console.print(f"{r['model_type']}: {r['route']}; packing {r['packing']}; attention "
                      f"{r['attn_implementation']}", markup=False, highlight=False)
        for key in ("quirks", "packing_reason", "test"):
            val = "; ".join(r[key]) if isinstance(r[key], list) else r[key]
            if val:
                console.print(f"    {key.replace('_', ' ')}: {val}", markup=False,
                              highlight=False)
    return 0


def cmd_recipes(args, console: Console) -> int:
    from plugtune import bundled
    from plugtune.config import list_bundled_recipes

    if args.recipes_command == "show":
        sys.stdout.write(bundled.recipe_text(args.name))
        return 0
    if args.recipes_command == "copy":
        target = bundled.copy_recipe(args.name, args.dir)
        console.print(f"wrote {target}; run it with: plugtune train {target}", markup=False,
                      highlight=False, soft_wrap=True)
        for line in bundled.missing_files(yaml_mapping(target), target.parent):
            console.print(f"  not on this machine: {line}", markup=False, highlight=False,
                          soft_wrap=True)
        return 0
    rows = [bundled.describe(n, p) for n, p in list_bundled_recipes().items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not console.is_terminal:  # piped: one full line per recipe, never cut at 80 columns
        for r in rows:
            print("\t".join([r["name"], r["base_model"], r["adapter"], r["method"],
                             ", ".join(r["datasets"])]))
        return 0
    tab = Table(title="bundled recipes (plugtune train NAME; plugtune recipes show|copy NAME)")
    widest = max((len(r["name"]) for r in rows), default=4)
    tab.add_column("name", no_wrap=True, min_width=widest)  # names are never cut
    for col in ("base_model", "adapter", "method", "datasets"):
        tab.add_column(col, overflow="fold")
    for r in rows:
        tab.add_row(r["name"], r["base_model"], r["adapter"], r["method"], ", ".join(r["datasets"]))
    console.print(tab)
    return 0


def yaml_mapping(path) -> dict:
    """A YAML file's mapping (``{}`` for an empty or non-mapping file)."""
    import yaml

    data = yaml.safe_load(open(path, encoding="utf-8").read())
    return data if isinstance(data, dict) else {}


def versions() -> list[str]:
    """``plugtune --version``: plugtune's version, then one line per installed plugin
    (``plugtune`` entry-point group): its name, distribution and version."""
    from importlib.metadata import PackageNotFoundError, entry_points, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "(not installed: source tree)"

    lines = [f"plugtune {ver('plugtune')}"]
    for ep in sorted(entry_points(group="plugtune"), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else ep.module.split(".")[0]
        lines.append(f"  plugin {ep.name}: {dist} {ver(dist)}")
    return lines


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(versions()))
        parser.exit()


def cmd_export(args, console: Console) -> int:
    from plugtune.export.run import export_run

    rep = export_run(args.run_dir, args.out, fmt=args.format, outtype=args.outtype,
                     ollama=args.ollama, system=args.system, force=args.force, verify=args.verify)
    console.print_json(json.dumps(rep, default=str))
    return 0


def cmd_chat(args, console: Console) -> int:
    from plugtune.chat import chat

    if sys.stdin.isatty():
        console.print("chat: type a message (/reset clears the history, /exit or Ctrl-D ends)",
                      markup=False)
    chat(args.run_dir, system=args.system, temperature=args.temperature, top_p=args.top_p,
         max_new_tokens=args.max_new_tokens)
    return 0


def cmd_merge(args, console: Console) -> int:
    from plugtune.merge import merge_run

    out = merge_run(args.run_dir, args.out_dir, force=args.force, base=args.base, dtype=args.dtype)
    auto = json.loads((out / "plugtune_merge.json").read_text())["auto_class"]
    console.print(f"merged model written to {out} (load it with {auto}.from_pretrained)",
                  markup=False)
    return 0


def cmd_quantize(args, console: Console) -> int:
    from plugtune.estimate import human
    from plugtune.quantize import quantize

    rep = quantize(args.source, args.method, args.out, force=args.force, eval_data=args.eval_data,
                   eval_type=args.type, max_samples=args.max_samples,
                   max_new_tokens=args.max_new_tokens)
    tab = Table(title=f"plugtune quantize --method {args.method} ({rep['device']}, "
                      f"{rep['rows']} held-out rows)")
    for col in ("model", "size on disk", "perplexity", "generation tokens/s"):
        tab.add_column(col)
    for name in ("reference", "quantized"):
        r = rep[name]
        label = f"reference ({r['dtype']})" if name == "reference" else args.method
        tab.add_row(label, human(r["size_bytes"]), str(r["perplexity"]), str(r["tokens_per_second"]))
    console.print(tab)
    console.print(f"size x{rep['size_ratio']}, perplexity {100 * rep['perplexity_change']:+.1f}%, "
                  f"speed x{rep['speed_ratio']} -> {args.out}/quantize_report.json", markup=False)
    return 0


def cmd_estimate(args, console: Console) -> int:
    from plugtune.config import load_recipe
    from plugtune.estimate import estimate, format_estimate, parse_memory

    recipe = load_recipe(args.recipe, args.overrides)
    dev = parse_memory(args.device_memory) if args.device_memory else None
    est = estimate(recipe, device=args.device, num_gpus=args.num_gpus)
    if args.json:
        print(json.dumps({**est.to_dict(), "device_memory": dev,
                          "fits": est.fits(dev) if dev else None}, indent=2))
    else:
        tab = Table(title=f"plugtune estimate: {args.recipe} (per device)")
        tab.add_column("component")
        tab.add_column("memory", justify="right")
        for row in format_estimate(est, dev):
            tab.add_row(*row)
        console.print(tab)
    return 0 if dev is None or est.fits(dev) else 1


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare, "generate": cmd_generate, "eval": cmd_eval,
            "plugins": cmd_plugins, "families": cmd_families, "recipes": cmd_recipes, "recipe": cmd_recipe, "merge": cmd_merge,
            "export": cmd_export, "chat": cmd_chat,
            "quantize": cmd_quantize, "estimate": cmd_estimate}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for chatty in ("matplotlib", "PIL", "httpcore", "fsspec"):  # debug chatter, not the run's
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: no progress bars
    from plugtune.observe import quiet

    quiet(verbose=args.verbose)  # library notices that do not concern the run; -v shows them
    # piped output: plugtune's own lines are never wrapped at rich's default 80 columns
    piped = not sys.stdout.isatty()
    # piped: tables are not cut or wrapped at rich's default 80 columns either
    console = Console(stderr=False, soft_wrap=piped,
                      width=int(os.environ.get("COLUMNS", 0)) or 240 if piped else None)
    try:
        return COMMANDS[args.command](args, console)
    except BrokenPipeError:  # `plugtune recipes | head -1`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except Exception as exc:
        from plugtune.config import RecipeError
        from plugtune.runstate import RunStateError

        # the light errors first: `train --resume` with nothing to resume never imports torch
        if not isinstance(exc, RecipeError | RunStateError) and not isinstance(exc, _known_errors()):
            raise
        Console(stderr=True, soft_wrap=not sys.stderr.isatty()).print(
            f"error: {exc}", style="bold red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
