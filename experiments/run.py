"""The classic instruction-tuning experiments on real models and real data (issue 19).

    nox -s experiments                      # the default profile (README table)
    python experiments/run.py [--profile default|reduced|quick] [--only samsum,packing,causal,dpo]

Everything runs through plugtune's own CLI, one process per step (``plugtune train RECIPE --set
...``, ``plugtune eval RUN --data ... --metrics ...``, ``plugtune merge``), so the experiments test
the product too. Models and data come from ``../shared/data`` (``$PLUGTUNE_SHARED`` overrides):

1. ``samsum``  SAMSum summarization with SmolLM2-135M-Instruct: ROUGE-1/2/L and loss on held-out
   test dialogues for the prompted base model, LoRA, full fine-tuning and QLoRA (bitsandbytes NF4
   on CPU; 8-bit LoRA if QLoRA fails; the error is recorded when neither runs); trainable
   parameters, seconds per optimizer step, peak RSS of the training process, tokens seen.
2. ``packing`` Dolly + LLaMA-Factory alpaca_en_demo, LoRA, packing vs padding: time to one epoch,
   held-out loss (alpaca_en_demo records not trained on) after the same optimizer steps; the
   padded run takes as many samples per micro-batch as a packed row-batch holds.
3. ``causal``  unsupervised causal-LM fine-tuning on the SAMSum dialogues as plain text:
   held-out perplexity (test dialogues) before/after on stories260K (full) and SmolLM2 (LoRA, full).
4. forgetting  after every SmolLM2 run of 1-3: loss on a fixed general instruction set none of
   them trains on (the last Dolly records), base vs tuned.
5. ``dpo``     SFT (LoRA on the chosen answers) -> merge -> DPO (LoRA, reference = adapter off) on
   SmolLM2 with dpo_en_demo: held-out preference accuracy (log-likelihood, before/after; implicit reward) and DPO loss.
   Before DPO the policy is the reference, so every implicit reward is 0: accuracy 0 (ties count
   as wrong, as in TRL), loss ln 2 = 0.6931.
The cheapest row (stories260K causal LM) runs twice: the spread between reruns is in the JSON.

SmolLM2 is a Q4_1 GGUF; it is de-quantized once into ``$PLUGTUNE_HOME/experiments`` (default
``~/.cache/plugtune/experiments``; ../shared/FINDINGS.md). A base model is evaluated through
``plugtune eval`` on a "run directory" holding links to its files and a recipe.yaml.

Writes ``experiments/results/<UTC time>.json`` (every row, the machine, ``uptime`` before and
after), ``.md`` (the tables) and ``.png`` (plots). Work files go to a temporary folder
(``--work`` keeps them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = "models/stories260K/hf"
SUMMARIZE = "Summarize the dialogue in one or two sentences."

#: slice sizes / steps per profile. ``default`` is sized for <= 40 min on an idle 2-core CPU
#: (SmolLM2 LoRA ~190 tokens/s there); ``reduced`` for a busy shared machine; ``quick`` is the CI
#: smoke (a few steps of 1 and 2, no generation, no forgetting set).
PROFILES = {
    "default": dict(seq=384, samsum_train=64, samsum_test=24, gen_tokens=48, forget=32,
                    dolly_train=64, alpaca_train=64, pack_heldout=32, text_train=64, text_test=24,
                    stories_train=256, dpo_train=32, dpo_test=24, micro=4, pack_rows=2,
                    epochs=1, rerun=True, samsum_variants=4),
    # for a busy shared machine (load 10-18 on 2 cores here: ~1/10 of the idle speed); the
    # README says which profile made the table
    "reduced": dict(seq=192, samsum_train=12, samsum_test=8, gen_tokens=32, forget=8,
                    dolly_train=12, alpaca_train=12, pack_heldout=8, text_train=8, text_test=6,
                    stories_train=64, dpo_train=8, dpo_test=6, micro=2, pack_rows=1,
                    epochs=1, rerun=True, samsum_variants=4),
    "quick": dict(seq=256, samsum_train=12, samsum_test=8, gen_tokens=0, forget=0,
                  dolly_train=8, alpaca_train=8, pack_heldout=8, text_train=8, text_test=8,
                  stories_train=32, dpo_train=8, dpo_test=8, micro=4, pack_rows=1,
                  epochs=1, rerun=False, samsum_variants=1),
}
LR = {"lora": 1e-3, "qlora": 1e-3, "none": 5e-5}


def shared_dir() -> Path:
    env = os.environ.get("PLUGTUNE_SHARED")
    return Path(env) if env else ROOT.parent / "shared"


def cache_home() -> Path:
    base = os.environ.get("PLUGTUNE_HOME") or Path.home() / ".cache" / "plugtune"
    return Path(base) / "experiments"


def smollm2_folder(gguf: Path) -> Path:
    """A transformers folder (config, fp32 safetensors, tokenizer with its ChatML template)
    de-quantized from ``gguf`` once, cached under :func:`cache_home` by file size + mtime.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied
    into a model built from the same config without ``quantization_config`` (FINDINGS.md)."""
    st = gguf.stat()
    dest = cache_home() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (dest / "model.safetensors").is_file():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".staging-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def base_run(model_dir: Path, recipe: dict, dest: Path) -> Path:
    """A run directory for an untrained model (links to its files + recipe.yaml), so the base
    is evaluated by ``plugtune eval`` exactly like a trained run."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    (dest / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "base_model": str(model_dir),
                                                      "adapter": "none"}))
    return dest


class Runner:
    """Runs plugtune CLI commands as child processes and records time and peak RSS."""

    def __init__(self, work: Path, threads: int, log=print):
        self.work, self.log = work, log
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.n, self.threads = 0, threads
        import threading

        self.lock = threading.Lock()  # in-process evals redirect the process's stdout: one at a time
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def plugtune(self, *args: str) -> dict:
        """``plugtune ARGS`` -> ``{"stdout", "seconds", "peak_rss_mib"}``; raises on failure
        with the tail of its output (the full log stays in the work folder)."""
        with self.lock:
            self.n += 1
            n = self.n
        logf = self.work / "logs" / f"{n:03d}-{args[0]}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(logf, "w") as fh:
            fh.write("$ plugtune " + " ".join(args) + "\n")
            fh.flush()
            p = subprocess.Popen([sys.executable, "-m", "plugtune", *args], stdout=fh,
                                 stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
            peak_kb = 0
            while p.poll() is None:  # VmHWM: the child's own high-water mark (see child_peak_kb)
                peak_kb = max(peak_kb, child_peak_kb(p.pid))
                time.sleep(0.1)
            rc = p.returncode
        secs = time.perf_counter() - t0
        out = logf.read_text()
        if rc != 0:
            raise RuntimeError(f"plugtune {' '.join(args)} failed (rc {rc}):\n{out[-3000:]}")
        self.log(f"  plugtune {' '.join(a if len(a) < 60 else '...' + a[-40:] for a in args)}"
                 f"  [{secs:.0f} s, {peak_kb / 1024:.0f} MiB]")
        return {"stdout": out, "seconds": round(secs, 1), "peak_rss_mib": round(peak_kb / 1024)}

    def train(self, recipe: Path, out: Path, **sets) -> dict:
        """``plugtune train RECIPE --set k=v ... --set output_dir=OUT``; returns the run's
        metrics.json + data_stats.json plus wall seconds and peak RSS of the process."""
        args = ["train", str(recipe)]
        for k, v in {**sets, "output_dir": str(out)}.items():
            args += ["--set", f"{k}={json.dumps(v) if isinstance(v, (bool, list)) else v}"]
        r = self.plugtune(*args)
        m = json.loads((out / "metrics.json").read_text())
        stats = json.loads((out / "data_stats.json").read_text())
        return {"metrics": m, "stats": stats, "process_seconds": r["seconds"],
                "peak_rss_mib": r["peak_rss_mib"]}

    def forget(self, run: Path, f: dict, p: dict) -> float | None:
        """Loss of ``run`` on the fixed forgetting set (None when the profile skips it)."""
        return self.eval(run, f["forget"], "dolly", "loss", p["forget"])["eval_loss"] if p["forget"] else None

    def eval(self, run: Path, data: Path, dtype: str, metrics: str, max_samples: int) -> dict:
        """``plugtune eval RUN --data DATA --type T --metrics M`` -> its JSON result. Runs the CLI
        in this process (``plugtune.cli.main``): evaluation needs no peak-memory figure, and a
        child process would pay the torch/transformers import again for every evaluation."""
        import contextlib
        import io

        import torch

        from plugtune.cli import main as plugtune_main

        args = ["eval", str(run), "--data", str(data), "--type", dtype, "--metrics", metrics,
                "--max-samples", str(max_samples), "--no-base"]  # the base is its own row
        buf = io.StringIO()
        t0 = time.perf_counter()
        with self.lock:
            self.n += 1
            n = self.n
            torch.set_num_threads(self.threads)
            with contextlib.redirect_stdout(buf):
                rc = plugtune_main(args)
        text = buf.getvalue()
        (self.work / "logs" / f"{n:03d}-eval.log").write_text("$ plugtune " + " ".join(args) + "\n" + text)
        if rc != 0:
            raise RuntimeError(f"plugtune {' '.join(args)} failed (rc {rc}):\n{text[-3000:]}")
        self.log(f"  plugtune eval {run.name} on {Path(data).name} ({metrics})  [{time.perf_counter() - t0:.0f} s]")
        return json.loads(text[text.index("{"):])


def child_peak_kb(pid: int) -> int:
    """``VmHWM`` (peak resident set, kB) of process ``pid`` from ``/proc/PID/status``; 0 when
    it is gone or ``/proc`` is absent. Polled while a child runs instead of ``wait4``'s
    ``ru_maxrss``, which Linux carries across ``execve``: a child started by this process (which
    holds the in-process evaluations, GBs) would report at least this process's own peak."""
    from plugtune.observe import proc_status_kib

    return proc_status_kib(pid).get("VmHWM", 0)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=None if path.suffix == ".jsonl" else 1)
    path.write_text(text if path.suffix != ".jsonl" else "\n".join(json.dumps(r) for r in obj) + "\n")
    return path


def slices(shared: Path, work: Path, p: dict) -> dict:
    """Disjoint train / held-out slices of the shared data, written to ``work/data``."""
    d = shared / "data"
    samsum_val = json.loads((d / "samsum/val.json").read_text())
    samsum_test = json.loads((d / "samsum/test.json").read_text())
    dolly = [json.loads(x) for x in (d / "dolly/dolly_validation_151.instruction_context_response.jsonl")
             .read_text().splitlines() if x.strip()]
    alpaca = json.loads((d / "llama_factory/alpaca_en_demo.json").read_text())
    pairs = json.loads((d / "llama_factory/dpo_en_demo.json").read_text())

    def short(x):  # pairs that fit sequence_len without cutting much
        return (sum(len(c["value"]) for c in x["conversations"])
                + max(len(x["chosen"]["value"]), len(x["rejected"]["value"]))) < 4 * p["seq"]

    pairs = [x for x in pairs if short(x)]
    if len(dolly) < p["dolly_train"] + p["forget"] or len(pairs) < p["dpo_train"] + p["dpo_test"]:
        raise ValueError("slices overlap: fewer Dolly records / short preference pairs than the profile needs")
    dpo_train, dpo_test = pairs[:p["dpo_train"]], pairs[-p["dpo_test"]:]
    out = work / "data"
    f = {
        "samsum_train": write_json(out / "samsum_train.json", samsum_val[:p["samsum_train"]]),
        "samsum_test": write_json(out / "samsum_test.json", samsum_test[:p["samsum_test"]]),
        "text_train": write_json(out / "dialogues_train.jsonl",
                                 [{"text": r["dialogue"]} for r in samsum_val[:p["text_train"]]]),
        "stories_train": write_json(out / "dialogues_train_stories.jsonl",
                                    [{"text": r["dialogue"]} for r in samsum_val[:p["stories_train"]]]),
        "text_test": write_json(out / "dialogues_test.jsonl",
                                [{"text": r["dialogue"]} for r in samsum_test[:p["text_test"]]]),
        "forget": write_json(out / "dolly_forget.jsonl", dolly[len(dolly) - max(p["forget"], 1):]),
        "dolly_train": write_json(out / "dolly_train.jsonl", dolly[:p["dolly_train"]]),
        "alpaca_train": write_json(out / "alpaca_train.json", alpaca[:p["alpaca_train"]]),
        "alpaca_heldout": write_json(out / "alpaca_heldout.json", alpaca[-p["pack_heldout"]:]),
        "dpo_train": write_json(out / "dpo_train.json", dpo_train),
        "dpo_test": write_json(out / "dpo_test.json", dpo_test),
        "dpo_sft": write_json(out / "dpo_sft.json", [
            {"conversations": [*x["conversations"], {"from": "gpt", "value": x["chosen"]["value"]}]}
            for x in dpo_train]),
    }
    return f


def recipe_file(work: Path, name: str, base: Path, datasets: list[dict], p: dict, **extra) -> Path:
    """A recipe YAML in the work folder: the settings every row shares (variants via --set)."""
    rec = {"base_model": str(base), "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
           "lora_target_modules": "all-linear", "datasets": datasets, "sequence_len": p["seq"],
           "micro_batch_size": p["micro"], "num_epochs": p["epochs"], "learning_rate": 1e-3,
           "lr_scheduler": "cosine", "warmup_steps": 0, "logging_steps": 1, "seed": 42,
           "eval_metrics": ["loss"], "save_total_limit": 1, **extra}
    path = work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    return path


def row_common(run: dict, model: str) -> dict:
    m, s = run["metrics"], run["stats"]
    steps = m.get("global_step") or 0
    return {"model": model, "train_samples": s.get("samples"), "rows": s.get("rows"),
            "steps": steps, "train_seconds": m.get("train_seconds"),
            "step_seconds": round(m["train_seconds"] / steps, 2) if steps else None,
            "process_seconds": run["process_seconds"], "peak_rss_mib": run["peak_rss_mib"],
            "tokens_seen": s.get("real_tokens"), "trained_tokens": s.get("trained_tokens"),
            "trainable_params": m.get("trainable_params"),
            "total_params": m.get("total_params"),
            "trainable_pct": round(100 * (m.get("trainable_share") or 0), 3),
            "first_loss": m.get("first_logged_loss"), "last_loss": m.get("last_logged_loss")}


def exp_samsum(r: Runner, smol: Path, f: dict, p: dict, forget_base: float) -> list[dict]:
    ds = {"path": str(f["samsum_train"]), "type": "prompt_completion",
          "columns": {"prompt": "dialogue", "completion": "summary"}, "system_prompt": SUMMARIZE}
    rec = recipe_file(r.work, "samsum", smol, [ds], p, generation={"max_new_tokens": max(p["gen_tokens"], 1)})
    metrics = "loss,rouge" if p["gen_tokens"] else "loss"
    base = base_run(smol, yaml.safe_load(rec.read_text()), r.work / "runs" / "samsum-base")
    rows = []
    ev = r.eval(base, f["samsum_test"], "prompt_completion", metrics, p["samsum_test"])
    rows.append({"experiment": "samsum", "variant": "base (prompted)", "model": "SmolLM2-135M-Instruct",
                 "steps": 0, **_task_metrics(ev), "forget_loss": forget_base})
    variants = [("LoRA r16 all-linear", {"adapter": "lora"}),
                ("full fine-tuning", {"adapter": "none", "learning_rate": LR["none"]}),
                ("QLoRA (bnb NF4, CPU)", {"adapter": "qlora"}),
                ("8-bit LoRA (bnb int8, CPU)", {"adapter": "lora", "load_in_8bit": True})]
    qlora_error = None
    for name, sets in variants[:p["samsum_variants"]]:
        if name.startswith("8-bit") and qlora_error is None:
            continue  # only when QLoRA did not run
        out = r.work / "runs" / f"samsum-{sets['adapter']}{'-8bit' if 'load_in_8bit' in sets else ''}"
        try:
            run = r.train(rec, out, **sets)
        except RuntimeError as exc:
            if name.startswith("QLoRA"):
                qlora_error = str(exc)[-600:]
                rows.append({"experiment": "samsum", "variant": name, "error": qlora_error})
                continue
            if name.startswith("8-bit"):
                rows.append({"experiment": "samsum", "variant": name, "error": str(exc)[-600:]})
                continue
            raise
        ev = r.eval(out, f["samsum_test"], "prompt_completion", metrics, p["samsum_test"])
        rows.append({"experiment": "samsum", "variant": name, **row_common(run, "SmolLM2-135M-Instruct"),
                     **_task_metrics(ev), "forget_loss": r.forget(out, f, p)})
    return rows


def _task_metrics(ev: dict) -> dict:
    out = {"heldout_loss": ev["eval_loss"], "heldout_n": ev.get("n") or None}
    for k in ("rouge1", "rouge2", "rougeL"):
        if k in ev:
            out[k] = round(100 * ev[k], 2)
    if ev.get("samples"):
        out["sample_prediction"] = ev["samples"][0]["prediction"][:200]
    return out


def exp_packing(r: Runner, smol: Path, f: dict, p: dict) -> list[dict]:
    dss = [{"path": str(f["dolly_train"]), "type": "dolly"}, {"path": str(f["alpaca_train"]), "type": "alpaca"}]
    rec = recipe_file(r.work, "packing", smol, dss, p)
    rows = []
    if p["pack_heldout"]:
        base = base_run(smol, yaml.safe_load(rec.read_text()), r.work / "runs" / "packing-base")
        ev0 = r.eval(base, f["alpaca_heldout"], "alpaca", "loss", p["pack_heldout"])
        rows.append({"experiment": "packing", "variant": "base (no training)", "model": "SmolLM2-135M-Instruct",
                     "steps": 0, "heldout_loss": ev0["eval_loss"]})
    out = r.work / "runs" / "dolly-packed"
    packed = r.train(rec, out, sample_packing=True, micro_batch_size=p["pack_rows"])
    st = packed["stats"]
    kept = st["samples"] - st.get("dropped", 0) - st.get("untrained", 0)
    per_batch = max(1, round(p["pack_rows"] * kept / max(st["rows"], 1)))
    runs = [("packing", out, packed)]
    out2 = r.work / "runs" / "dolly-padded"
    padded = r.train(rec, out2, sample_packing=False, micro_batch_size=per_batch)
    runs.append(("padding", out2, padded))
    for name, o, run in runs:
        ev = (r.eval(o, f["alpaca_heldout"], "alpaca", "loss", p["pack_heldout"])
              if p["pack_heldout"] else {"eval_loss": None})
        rows.append({"experiment": "packing", "variant": name, **row_common(run, "SmolLM2-135M-Instruct"),
                     "micro_batch_size": run["metrics"].get("micro_batch_size") or (
                         p["pack_rows"] if name == "packing" else per_batch),
                     "pad_fraction": run["stats"].get("pad_fraction"),
                     "heldout_loss": ev["eval_loss"], "forget_loss": r.forget(o, f, p)})
    return rows


def exp_causal(r: Runner, smol: Path, stories: Path, f: dict, p: dict, forget_base: float) -> list[dict]:
    rows = []
    ds = [{"path": str(f["text_train"]), "type": "text"}]
    rec = recipe_file(r.work, "causal-smollm2", smol, ds, p, eval_metrics=["loss", "perplexity"])
    base = base_run(smol, yaml.safe_load(rec.read_text()), r.work / "runs" / "causal-smol-base")
    ev0 = r.eval(base, f["text_test"], "text", "loss,perplexity", p["text_test"])
    for name, sets in [("LoRA r16 all-linear", {"adapter": "lora"}),
                       ("full fine-tuning", {"adapter": "none", "learning_rate": LR["none"]})]:
        out = r.work / "runs" / f"causal-smol-{sets['adapter']}"
        run = r.train(rec, out, **sets)
        ev = r.eval(out, f["text_test"], "text", "loss,perplexity", p["text_test"])
        rows.append({"experiment": "causal", "variant": name, **row_common(run, "SmolLM2-135M-Instruct"),
                     "ppl_before": ev0["perplexity"], "ppl_after": ev["perplexity"],
                     "forget_loss_base": forget_base, "forget_loss": r.forget(out, f, p)})
    ds = [{"path": str(f["stories_train"]), "type": "text"}]
    rec = recipe_file(r.work, "causal-stories", stories, ds, p, adapter="none", learning_rate=1e-3,
                      micro_batch_size=8, eval_metrics=["loss", "perplexity"])
    base = base_run(stories, yaml.safe_load(rec.read_text()), r.work / "runs" / "causal-stories-base")
    ev0 = r.eval(base, f["text_test"], "text", "loss,perplexity", p["text_test"])
    for i in range(2 if p["rerun"] else 1):
        out = r.work / "runs" / f"causal-stories-{i}"
        run = r.train(rec, out)
        ev = r.eval(out, f["text_test"], "text", "loss,perplexity", p["text_test"])
        rows.append({"experiment": "causal", "variant": f"full fine-tuning (run {i + 1})",
                     **row_common(run, "stories260K"), "ppl_before": ev0["perplexity"],
                     "ppl_after": ev["perplexity"]})
    return rows


def exp_dpo(r: Runner, smol: Path, f: dict, p: dict) -> list[dict]:
    sft_rec = recipe_file(r.work, "dpo-sft", smol, [{"path": str(f["dpo_sft"]), "type": "sharegpt"}], p,
                          learning_rate=2e-4)
    sft_out = r.work / "runs" / "dpo-sft"
    sft = r.train(sft_rec, sft_out)
    merged = r.work / "runs" / "dpo-sft-merged"
    r.plugtune("merge", str(sft_out), str(merged), "--force")
    dpo_rec = recipe_file(r.work, "dpo", merged, [{"path": str(f["dpo_train"]), "type": "preference"}], p,
                          rl="dpo", dpo_beta=0.1, learning_rate=2e-4, micro_batch_size=2,
                          test_datasets=[{"path": str(f["dpo_test"]), "type": "preference"}])
    out = r.work / "runs" / "dpo"
    run = r.train(dpo_rec, out)
    m = run["metrics"]
    ev = r.eval(out, f["dpo_test"], "preference", "loss", p["dpo_test"])  # plugtune eval on a DPO run
    before, after = ev["reference"], ev["trained"]
    return [{"experiment": "dpo", "variant": "SFT (LoRA on chosen answers)", **row_common(sft, "SmolLM2-135M-Instruct")},
            {"experiment": "dpo", "variant": "DPO (LoRA, beta 0.1) on the merged SFT model",
             **row_common(run, "SmolLM2-135M-Instruct"), "train_pairs": len(json.loads(Path(f["dpo_train"]).read_text())),
             "heldout_pairs": after["pairs"],
             "logp_acc_before": before["logp_accuracy"], "logp_acc_after": after["logp_accuracy"],
             "pref_acc_after": after["reward_accuracy"], "margin_after": after["reward_margin"],
             "trl_pref_acc_after": m.get("eval_rewards/accuracies"),
             "dpo_loss_before": 0.6931, "dpo_loss_after": m.get("eval_loss"),
             "train_acc_first": m.get("first_rewards_accuracies"), "train_acc_last": m.get("last_rewards_accuracies")}]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(res: dict) -> str:
    """The tables of one result (what the README quotes)."""
    failed = [x for x in res["rows"] if x.get("variant") == "failed"]
    rows = [x for x in res["rows"] if x.get("variant") != "failed"]
    L = [f"# plugtune experiments {res['name']} ({res['profile']} profile"
         f"{'' if res.get('complete', True) else '; PARTIAL: finished ' + ', '.join(res.get('finished', []))})", "",
         f"`{res['command']}` on {res['machine']['cores']} CPU cores ({res['machine']['platform']}), "
         f"torch {res['machine']['torch']}, {res['threads']} threads per run; total {res['total_seconds']:.0f} s.",
         f"Load before: `{res['uptime_before']}`; after: `{res['uptime_after']}`.", ""]
    sam = [x for x in rows if x["experiment"] == "samsum"]
    if sam:
        L += ["## 1. SAMSum summarization, SmolLM2-135M-Instruct",
              f"train {res['sizes']['samsum_train']} val dialogues, 1 epoch; held-out {res['sizes']['samsum_test']} "
              f"test dialogues (ROUGE F1 x100, greedy, <= {res['sizes']['gen_tokens']} new tokens); "
              f"forgetting = loss on {res['sizes']['forget']} Dolly records no run trains on.", "",
              "| variant | trainable (% of total) | steps | s/step | train s | peak RSS MiB | tokens seen "
              "| ROUGE-1 | ROUGE-2 | ROUGE-L | held-out loss | forgetting loss |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in sam:
            if "error" in x:
                L.append(f"| {x['variant']} | did not run: {x['error'].splitlines()[-1][:160]} |"
                         + " |" * 10)
                continue
            tp = f"{x['trainable_params']:,} ({x['trainable_pct']} %)" if x.get("trainable_params") else "-"
            L.append(f"| {x['variant']} | {tp} | {x.get('steps', 0)} | {fmt(x.get('step_seconds'))} | "
                     f"{fmt(x.get('train_seconds'), 0)} | {fmt(x.get('peak_rss_mib'))} | {fmt(x.get('tokens_seen'))} | "
                     f"{fmt(x.get('rouge1'))} | {fmt(x.get('rouge2'))} | {fmt(x.get('rougeL'))} | "
                     f"{fmt(x.get('heldout_loss'), 3)} | {fmt(x.get('forget_loss'), 3)} |")
        L.append("")
    pk = [x for x in rows if x["experiment"] == "packing"]
    if pk:
        L += ["## 2. Dolly + alpaca_en_demo, LoRA: packing vs padding, SmolLM2-135M-Instruct",
              f"train {res['sizes']['dolly_train']} Dolly + {res['sizes']['alpaca_train']} alpaca_en_demo records, "
              f"one epoch, sequence_len {res['sizes']['seq']}; held-out loss on the last {res['sizes']['pack_heldout']} "
              "alpaca_en_demo records.", "",
              "| layout | micro-batch | rows | steps | train s (1 epoch) | s/step | peak RSS MiB | tokens seen "
              "| held-out loss | forgetting loss |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in pk:
            if not x.get("steps"):
                L.append(f"| {x['variant']} | - | - | 0 | - | - | - | - | {fmt(x['heldout_loss'], 3)} | "
                         f"{fmt(res.get('forget_base'), 3)} |")
                continue
            L.append(f"| {x['variant']} | {x['micro_batch_size']} | {x['rows']} | {x['steps']} | "
                     f"{fmt(x['train_seconds'], 0)} | {fmt(x['step_seconds'])} | {x['peak_rss_mib']} | "
                     f"{x['tokens_seen']} | {fmt(x['heldout_loss'], 3)} | {fmt(x['forget_loss'], 3)} |")
        if res.get("packing_speedup"):
            L += ["", f"**Packing speed-up (padding time / packing time to one epoch): "
                      f"{res['packing_speedup']:.2f}x**"]
        L.append("")
    ca = [x for x in rows if x["experiment"] == "causal"]
    if ca:
        L += ["## 3. Causal-LM fine-tuning on SAMSum dialogues as plain text",
              f"SmolLM2: {res['sizes']['text_train']} dialogues, stories260K: {res['sizes']['stories_train']}; "
              f"held-out perplexity on {res['sizes']['text_test']} test dialogues.", "",
              "| model | variant | steps | train s | peak RSS MiB | tokens seen | ppl before | ppl after | "
              "forgetting loss base -> tuned |", "|---|---|---|---|---|---|---|---|---|"]
        for x in ca:
            fg = (f"{fmt(x['forget_loss_base'], 3)} -> {fmt(x['forget_loss'], 3)}"
                  if x.get("forget_loss") is not None else "-")
            L.append(f"| {x['model']} | {x['variant']} | {x['steps']} | {fmt(x['train_seconds'], 0)} | "
                     f"{x['peak_rss_mib']} | {x['tokens_seen']} | {fmt(x['ppl_before'])} | "
                     f"{fmt(x['ppl_after'])} | {fg} |")
        if res.get("rerun_spread"):
            s = res["rerun_spread"]
            L += ["", f"Rerun spread (stories260K row run twice, same seed): perplexity after "
                      f"{s['ppl_after']}, train seconds {s['train_seconds']}."]
        L.append("")
    dp = [x for x in rows if x["experiment"] == "dpo"]
    if len(dp) == 2:
        d = dp[-1]
        L += ["## 5. SFT -> DPO, SmolLM2-135M-Instruct, dpo_en_demo",
              f"SFT: LoRA on the chosen answers of {d.get('train_pairs')} pairs ({dp[0]['steps']} steps, "
              f"{fmt(dp[0]['train_seconds'], 0)} s), merged; DPO: LoRA, reference = adapter off, "
              f"{d.get('steps')} steps, {fmt(d.get('train_seconds'), 0)} s, peak RSS {d.get('peak_rss_mib')} MiB; "
              f"held-out {d.get('heldout_pairs')} pairs.", "",
              "| | before DPO | after DPO |", "|---|---|---|",
              f"| held-out pairs whose chosen answer is the more likely (summed log-prob) | "
              f"{fmt(d.get('logp_acc_before'))} (the SFT model) | {fmt(d.get('logp_acc_after'))} |",
              f"| held-out implicit-reward accuracy (TRL rewards/accuracies) | 0 by definition "
              f"(policy = reference) | {fmt(d.get('pref_acc_after'))} |",
              f"| held-out DPO loss | {d['dpo_loss_before']} (ln 2) | {fmt(d.get('dpo_loss_after'), 4)} |",
              f"| held-out reward margin | 0 | {fmt(d.get('margin_after'), 4)} |",
              f"| training-batch implicit-reward accuracy, first -> last logged step | "
              f"{fmt(d.get('train_acc_first'))} | {fmt(d.get('train_acc_last'))} |", "",
              "Held-out numbers: `plugtune eval` on the DPO run (log-probs of the answer tokens "
              "with the adapter on and off; they reproduce TRL's eval metrics, "
              "`test_dpo_eval_matches_trl_eval_and_scores_the_reference`).", ""]
    for x in failed:
        L += [f"**{x['experiment']} failed:** `{x['error'].strip().splitlines()[-1][:300]}`", ""]
    L += ["Every number: `plugtune train` / `plugtune eval` child processes; seconds = the run's "
          "training loop (metrics.json `train_seconds`), peak RSS = the training process's own high-water mark (VmHWM). "
          "Seeded (seed 42); the machine is shared, so seconds vary more than metrics."]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    sam = [x for x in rows if x["experiment"] == "samsum" and "error" not in x]
    ax = axes[0]
    if sam and any("rouge1" in x for x in sam):
        names = [x["variant"].split(" (")[0] for x in sam]
        for i, k in enumerate(("rouge1", "rouge2", "rougeL")):
            ax.bar([j + 0.27 * i for j in range(len(sam))], [x.get(k, 0) for x in sam], 0.27, label=k)
        ax.set_xticks([j + 0.27 for j in range(len(sam))], names, rotation=15, fontsize=8)
        ax.legend()
    ax.set_title("1. SAMSum ROUGE (x100)")
    ax = axes[1]
    fg = [x for x in rows if x.get("forget_loss") is not None]
    ax.barh([f"{x['experiment']}: {x['variant'].split(' (')[0]}" for x in fg], [x["forget_loss"] for x in fg])
    if res.get("forget_base") is not None:
        ax.axvline(res["forget_base"], color="k", ls="--", label="base")
        ax.legend()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("4. forgetting: loss on held-out Dolly")
    ax = axes[2]
    ca = [x for x in rows if x["experiment"] == "causal"]
    if ca:
        lab = [f"{x['model'][:9]} {x['variant'].split(' (')[0]}" for x in ca]
        ax.barh(lab, [x["ppl_before"] for x in ca], label="before", alpha=0.5)
        ax.barh(lab, [x["ppl_after"] for x in ca], label="after", alpha=0.8)
        ax.set_xscale("log")
        ax.legend()
        ax.tick_params(axis="y", labelsize=7)
    ax.set_title("3. held-out perplexity (text)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(res: dict, out: Path, name: str, t0: float, final: bool) -> None:
    """Derived figures (packing speed-up, rerun spread) and ``out/name.{json,md,png}``, written
    atomically; called after every experiment (``final=False`` marks a partial result)."""
    rows = res["rows"]
    pk = {x["variant"]: x for x in rows if x["experiment"] == "packing" and x.get("steps")}
    if "packing" in pk and "padding" in pk:
        res["packing_speedup"] = round(pk["padding"]["train_seconds"] / pk["packing"]["train_seconds"], 2)
    reruns = [x for x in rows if x["experiment"] == "causal" and x.get("model") == "stories260K"]
    if len(reruns) == 2:
        res["rerun_spread"] = {k: [reruns[0][k], reruns[1][k]] for k in ("ppl_after", "train_seconds", "last_loss")}
    res["complete"] = final
    res["uptime_after"] = uptime()
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, make in ((".json", lambda: json.dumps(res, indent=1, default=str)), (".md", lambda: markdown(res))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(make())  # the JSON is on disk before the table is rendered
        os.replace(tmp, out / f"{name}{suffix}")
    try:
        plot(res, out / f"{name}.png")
    except Exception as exc:  # a plot is not worth the run
        print(f"plot failed: {exc}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1,
                    help="experiments run side by side (their training processes overlap; seconds "
                         "then measure a shared CPU)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default", help="slice sizes")
    ap.add_argument("--quick", action="store_true", help="= --profile quick (the CI-sized smoke)")
    ap.add_argument("--only", default="samsum,packing,causal,dpo",
                    help="comma list of samsum, packing, causal, dpo")
    ap.add_argument("--name", default=None, help="result file name (default: UTC time)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder")
    ap.add_argument("--work", default=None, help="keep work files (runs, logs) in this folder")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: all cores on an idle machine, 1 when the "
                         "load average exceeds the cores: OpenMP threads that get preempted wait on "
                         "each other, measured here 277 s vs 24 s per SmolLM2 LoRA step)")
    a = ap.parse_args(argv)
    shared = shared_dir()
    if not (shared / "data" / GGUF).is_file():
        print(f"experiments: {shared / 'data'} has no {GGUF}: nothing to run", file=sys.stderr)
        return 2
    profile = "quick" if a.quick else a.profile
    p = PROFILES[profile]
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    name = a.name or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="plugtune-exp-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    up0 = uptime()
    print(f"experiments {name}: profile {profile}, work {work}; {up0}")
    smol = smollm2_folder(shared / "data" / GGUF)
    stories = shared / "data" / STORIES
    f = slices(shared, work, p)
    threads = a.threads or (1 if os.getloadavg()[0] > (os.cpu_count() or 1) else (os.cpu_count() or 1))
    r = Runner(work, threads)
    rows: list[dict] = []
    res = {"name": name, "profile": profile, "command": "python experiments/run.py"
           + (f" --profile {profile}" if profile != "default" else "")
           + (f" --only {a.only}" if a.only != ap.get_default("only") else "")
           + (f" --jobs {a.jobs}" if a.jobs != 1 else ""), "jobs": a.jobs,
           "machine": machine(), "threads": threads, "uptime_before": up0, "sizes": p,
           "smollm2_folder": str(smol), "rows": rows}
    forget_base = None
    if p["forget"] and any(x in only for x in ("samsum", "causal", "packing")):
        rec = recipe_file(work, "forget-base", smol, [{"path": str(f["forget"]), "type": "dolly"}], p)
        fb = base_run(smol, yaml.safe_load(rec.read_text()), work / "runs" / "forget-base")
        forget_base = r.eval(fb, f["forget"], "dolly", "loss", p["forget"])["eval_loss"]
        res["forget_base"] = forget_base
    steps = {"samsum": lambda: exp_samsum(r, smol, f, p, forget_base),
             "packing": lambda: exp_packing(r, smol, f, p),
             "causal": lambda: exp_causal(r, smol, stories, f, p, forget_base),
             "dpo": lambda: exp_dpo(r, smol, f, p)}
    done: dict[str, list[dict]] = {}
    out = Path(a.out)

    def one(key: str) -> None:
        print(f"[{key}] starts at {time.perf_counter() - t0:.0f} s")
        try:
            got = steps[key]()
        except Exception as exc:  # keep the other experiments; the error goes into the results
            print(f"[{key}] failed: {str(exc)[-1500:]}", file=sys.stderr)
            got = [{"experiment": key, "variant": "failed", "error": str(exc)[-1500:]}]
        with r.lock:  # results so far on disk after every experiment: a cut-off run keeps them
            done[key] = got
            rows[:] = [x for k in only for x in done.get(k, [])]
            res["finished"] = [k for k in only if k in done]
            save(res, out, name, t0, final=False)
        print(f"[{key}] done at {time.perf_counter() - t0:.0f} s")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # training runs are child processes
        list(pool.map(one, only))
    save(res, out, name, t0, final=True)
    print(markdown(res))
    print(f"wrote {out / name}.{{json,md,png}} in {res['total_seconds']:.0f} s")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in x and x["variant"] == "failed" for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
