"""plugtune training-throughput benchmark (issue 8): plugtune vs TRL vs a bare torch loop.

    nox -s bench                                   # what CI / the README quote
    python bench/run.py [--name NAME] [--quick] [--models llama-20m,stories260k,smollm2-135m]
                        [--threads 2] [--prep-samples 1000,10000,100000]

Models: ``llama-20m`` (19.5M, from a config, full fine-tuning), ``stories260k`` (real, 0.29M, full
fine-tuning) and ``smollm2-135m`` (the real SmolLM2-135M-Instruct, its GGUF de-quantized to a
safetensors folder once per bench, LoRA r16 all-linear in every method, 2 rows per step).

For each model, on the same data (Dolly 151 + LLaMA-Factory Alpaca 999, alpaca chat template),
``sequence_len``, real tokens per optimizer step and number of optimizer steps, one process per
run measures:

  (a) plugtune      plugtune's SFT path (``plugtune.train.train``) with ``sample_packing``
  (b) trl_default   TRL ``SFTTrainer`` defaults: one padded sample per row, no packing
  (c) trl_packing   TRL ``SFTTrainer(packing=True)``: best-fit rows, padding-free (flattened)
  (d) bare_loop     forward/backward/optimizer step on the very micro-batches (a) trains on
                    (its Trainer's dataloader, collated to tensors before the clock starts),
                    with (a)'s model, loss and optimizer (fused AdamW) and nothing else: no
                    clipping, scheduler, logging or data loading; (d') the same loop with the
                    model's own ``.loss`` (full LM head)

(b) and (c) override TRL's bf16 and gradient checkpointing defaults with fp32 / no checkpointing
(both are 3-24x slower on a CPU without AMX: ../shared/FINDINGS.md), so the comparison is about
data layout. All runs are full fine-tuning in fp32 with the same torch thread count. TRL runs
use transformers' ``sdpa``; plugtune's packed CPU path (a, d) loads the model with its per-sample
``sdpa`` (``plugtune.attention``) and computes the LM head only on trained positions
(``plugtune.modeling.label_only_loss``). The padded run (b) gets about the real tokens per optimizer step of the packed runs by
taking ``round(tokens_per_step / mean_sample_len)`` samples per step (micro-batches of <= 16,
with gradient accumulation beyond).

Data preparation at scale: plugtune's pipeline on the Dolly file replicated to each of
``--prep-samples`` samples, one process per size (so each size's peak RSS is its own); datasets'
Arrow caching stays on, so mapped columns live in memory-mapped files, not in the heap.

Writes ``bench/results/<name>.json`` (ratios of the first model at the top level under "a/b",
"a/c", "a/d"; every model under "models"), ``<name>.png`` (bar chart) and ``<name>.md`` (table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from measure import (  # noqa: E402
    TARGETS,
    flop_ceiling,
    linear_fit,
    linearity,
    padded_batching,
    ratios,
    table,
    verdicts,
)

METHODS = ["plugtune", "trl_default", "trl_packing", "bare_loop"]
LETTER = {"plugtune": "a", "trl_default": "b", "trl_packing": "c", "bare_loop": "d"}

#: measured steps / warm-up steps per model (full run); --quick divides the measured steps
#: ``inproc_steps``: measured steps of each of the 4 alternating phases of the (d) process
#: ``rows_per_batch`` / ``adapter``: per-model overrides of ``--rows-per-batch`` / full fine-tuning
MODELS = {
    "llama-20m": {"steps": 4, "warmup": 1, "inproc_steps": 6},
    "stories260k": {"steps": 16, "warmup": 1, "inproc_steps": 16},
    # the real SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32) with LoRA r16 all-linear:
    # ~190 real tokens/s on 2 idle cores, so 2 rows (~1000 tokens) per step and few steps
    "smollm2-135m": {"steps": 3, "warmup": 1, "inproc_steps": 2, "min_steps": 2,
                     "rows_per_batch": 2, "adapter": "lora"},
}
SMOLLM2_GGUF = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def shared_dir() -> Path:
    env = os.environ.get("PLUGTUNE_SHARED")
    return Path(env) if env else ROOT.parent / "shared"


def data_files(shared: Path) -> list[dict]:
    d = shared / "data"
    return [
        {"path": str(d / "dolly" / "dolly_validation_151.instruction_context_response.jsonl"), "type": "dolly"},
        {"path": str(d / "llama_factory" / "alpaca_en_demo.json"), "type": "alpaca"},
    ]


def fitting_data(files: list[dict], model_dir: str, sequence_len: int, dest: Path,
                 margin: int = 4) -> tuple[list[dict], dict]:
    """Copies of the data files (same formats) without the samples that do not fit
    ``sequence_len`` with this model's tokenizer, so no method truncates or drops anything and
    all four see the same samples (plugtune drops over-long samples, TRL truncates them).

    A sample's length is its alpaca-template rendering tokenized with BOS, plus ``margin``
    tokens of slack for tokenizing the prompt and response apart. Returns the new dataset
    entries and ``{file name: [kept, total]}``.
    """
    from transformers import AutoTokenizer

    from plugtune.data.formats import ADAPTERS
    from plugtune.data.templates import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tok, "alpaca")
    dest.mkdir(parents=True, exist_ok=True)
    out, counts = [], {}
    for d in files:
        src = Path(d["path"])
        text = src.read_text(encoding="utf-8")
        records = ([json.loads(x) for x in text.splitlines() if x.strip()] if src.suffix == ".jsonl"
                   else json.loads(text))
        keep = []
        for rec in records:
            msgs = ADAPTERS[d["type"]](rec, {})["messages"]
            rendered = tok.apply_chat_template(msgs, tokenize=False)
            if len(tok(rendered)["input_ids"]) + margin <= sequence_len:
                keep.append(rec)
        path = dest / src.name
        path.write_text("\n".join(json.dumps(r) for r in keep) + "\n" if src.suffix == ".jsonl"
                        else json.dumps(keep), encoding="utf-8")
        out.append({**d, "path": str(path)})
        counts[src.name] = [len(keep), len(records)]
    return out, counts


def build_llama_20m(dest: Path) -> dict:
    """A Llama-architecture model from a config: hidden 256, 4 layers, 8 heads, MLP 688, untied
    embeddings over the Llama 2 tokenizer's 32000 tokens: 19.5M parameters. Random weights."""
    from plugtune.testing import load_shared_tokenizer
    from plugtune_llama.tiny import save_tiny

    tok = load_shared_tokenizer("llama2")
    save_tiny("llama", dest, tok, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    cfg = json.loads((dest / "config.json").read_text())
    h, v, n, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    params = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    return {"path": str(dest), "params": params, "config": {k: cfg[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}}


def build_smollm2(shared: Path, dest: Path) -> dict:
    """The real SmolLM2-135M-Instruct as a plain safetensors folder: transformers loads the
    GGUF (``gguf_file=``, de-quantized to fp32) but refuses to save a GGUF-loaded model, so the
    weights go into a model built ``from_config`` without the quantization entry
    (../shared/FINDINGS.md); the tokenizer comes from the same GGUF.

    Raises:
        FileNotFoundError: the GGUF is not in ``shared/data/models``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = shared / "data" / "models" / SMOLLM2_GGUF[0]
    if not (folder / SMOLLM2_GGUF[1]).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF[1]} not found")
    t = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF[1], dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    plain.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF[1]).save_pretrained(dest)
    params = sum(p.numel() for p in plain.parameters())
    return {"path": str(dest), "params": params, "dequantize_s": round(time.perf_counter() - t, 1),
            "source": f"{SMOLLM2_GGUF[0]}/{SMOLLM2_GGUF[1]} (de-quantized to fp32)"}


def a_c_ceiling(runs: dict, adapter: bool) -> dict | None:
    """:func:`measure.flop_ceiling` from (a)'s model facts and packed sample lengths and (c)'s
    tokens per row (its real tokens per step over the rows of a step); ``None`` when either run
    is missing."""
    a, c = runs.get("plugtune"), runs.get("trl_packing")
    if not a or not c or not (a.get("packing_floor") or {}).get("sample_lengths"):
        return None
    rows = c.get("micro_batch", 1) * c.get("grad_accum", 1)
    return flop_ceiling(a["linear_macs_per_token"], a["head_macs_per_token"], a["attn_width"],
                        a["layers"], a["packing_floor"]["sample_lengths"], a["trained_fraction"],
                        c["real_tokens_per_step"] / rows, adapter)


def best_of(rounds: list[dict]) -> dict:
    """The round with the highest real tokens/s (other load only ever slows a run down, as in
    ``timeit``'s best-of), every other figure from that same round, except the peak RSS: the
    largest of all rounds."""
    best = dict(max(rounds, key=lambda r: r["real_tokens_per_s"]))
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rounds)
    return best


def run_worker(cfg: dict, tmp: Path, env: dict, timeout: float) -> dict:
    """Run one workload in a fresh process; return its result dict (raises on failure)."""
    tag = f"{cfg.get('model_name', 'data')}_{cfg['method']}_r{cfg.get('round', 0)}"
    cfg = {**cfg, "out": str(tmp / f"{tag}.json")}
    cfg_path = tmp / f"{tag}.cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    log = tmp / f"{tag}.log"
    wenv = {**env, "HF_DATASETS_CACHE": str(tmp / f"hf-cache-{tag}")}
    t = time.perf_counter()
    with open(log, "w") as fh:
        # its own session: on a timeout the whole group goes (datasets' map workers too)
        proc = subprocess.Popen([sys.executable, str(HERE / "run.py"), "--worker", str(cfg_path)],
                                env=wenv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{tag} ran past --timeout {timeout:.0f} s (log: {log})") from None
    if proc.returncode != 0 or not Path(cfg["out"]).exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{tag} failed (rc {proc.returncode}); last lines of its log:\n{tail}")
    res = json.loads(Path(cfg["out"]).read_text())
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


COLUMNS = [("run", "run", ""), ("real_tokens_per_s", "real tok/s", ".0f"),
           ("real_tokens_per_s_median", "median", ".0f"),
           ("pad_pct", "pad %", ".1f"), ("real_tokens_per_step", "real tok/step", ".0f"),
           ("s_per_step", "s/step", ".2f"), ("batch", "micro x accum", ""),
           ("time_to_first_step_s", "s to 1st step", ".1f"), ("data_prep_s", "data prep s", ".1f"),
           ("peak_rss_mib", "peak RSS MiB", ".0f"), ("attn_implementation", "attention", "")]


def summarize(models: dict) -> str:
    out = []
    for name, m in models.items():
        rows = []
        for meth in METHODS:
            r = m["runs"].get(meth)
            if r is None:
                continue
            long_rows = meth in ("plugtune", "bare_loop") and m.get("multipack_real_batches") is False
            batch = (f"1 row of {m['rows_per_batch']}x{m['sequence_len']} x 1" if long_rows
                     else f"{r.get('micro_batch', m['rows_per_batch'])} x {r.get('grad_accum', 1)}")
            rows.append({**r, "run": f"({LETTER[meth]}) {meth}", "pad_pct": 100 * r["pad_fraction"],
                         "batch": batch})
            if r.get("same_process"):
                sp = r["same_process"]
                rows.append({"run": "(a) plugtune again, in (d)'s process", "batch": rows[-1]["batch"],
                             "real_tokens_per_s": sp["trainer_real_tokens_per_s"],
                             "pad_pct": rows[-1]["pad_pct"], "real_tokens_per_step": r["real_tokens_per_step"],
                             "attn_implementation": r.get("attn_implementation")})
            if r.get("model_loss_real_tokens_per_s"):
                rows.append({"run": "(d') bare_loop, model's own loss", "batch": rows[-1]["batch"],
                             "real_tokens_per_s": r["model_loss_real_tokens_per_s"],
                             "real_tokens_per_s_median": r.get("model_loss_real_tokens_per_s_median"),
                             "s_per_step": r["model_loss_s_per_step"], "pad_pct": rows[-1]["pad_pct"],
                             "real_tokens_per_step": r["real_tokens_per_step"],
                             "attn_implementation": r.get("attn_implementation")})
        rt = ", ".join(f"{k} = {v}" for k, v in m["ratios"].items()) + " (from medians: " + ", ".join(
            f"{k} = {v}" for k, v in m.get("ratios_from_median_step", {}).items()) + ")"
        if m.get("peak_rss_ratios"):
            rt += "; peak RSS " + ", ".join(f"{k} = {v}" for k, v in m["peak_rss_ratios"].items())
        if m.get("a_c_flop_ceiling"):
            cl = m["a_c_flop_ceiling"]
            rt += (f"; a/c explained by arithmetic per real token (measure.flop_ceiling): "
                   f"{cl['a_c_ceiling']} ({cl['c_macs_per_token']:,} vs {cl['a_macs_per_token']:,} MACs)")
        layout = ("one row of rows_per_batch x sequence_len per micro-batch (multipack_real_batches: false)"
                  if m.get("multipack_real_batches") is False else "rows of sequence_len")
        rt += f"; (a)/(d) pack {layout}"
        kept = ", ".join(f"{k} {a}/{b}" for k, (a, b) in m.get("samples_kept_of_total", {}).items())
        out.append(f"### {name} ({m['params'] / 1e6:.2f}M params, sequence_len {m['sequence_len']}, "
                   f"{m['measured_steps']} measured steps after {m['warmup_steps']} warm-up; "
                   f"samples that fit: {kept})\n\n"
                   + table(rows, COLUMNS) + f"\n\nratios: {rt}\n")
    return "\n".join(out)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    prep = results.get("prep_scaling")
    if prep and not prep.get("points"):
        prep = None  # every size failed (see "failed" in the JSON)
    n = len(models) + (1 if prep else 0)
    if n == 0:
        return  # nothing measured, nothing to draw
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    colors = {"plugtune": "#2a7ab9", "trl_default": "#c8553d", "trl_packing": "#f28f3b",
              "bare_loop": "#7a7a7a"}
    for ax, (name, m) in zip(axes[0], models.items()):
        meths = [x for x in METHODS if x in m["runs"]]
        vals = [m["runs"][x]["real_tokens_per_s"] for x in meths]
        bars = ax.bar([f"({LETTER[x]})\n{x}" for x in meths], vals, color=[colors[x] for x in meths])
        for b, x in zip(bars, meths):
            r = m["runs"][x]
            ax.annotate(f"{r['real_tokens_per_s']:.0f}\npad {100 * r['pad_fraction']:.1f}%",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{name}: " + ", ".join(f"{k} {m['ratios'][k]}" for k in ("a/b", "a/c", "a/d")
                                             if k in m["ratios"]), fontsize=9)
        ax.set_ylabel("real (non-pad) tokens / s")
        ax.set_ylim(0, max(vals) * 1.25)
        ax.tick_params(axis="x", labelsize=8)
    if prep:
        ax = axes[0][-1]
        pts = prep["points"]
        ax.plot([p["samples"] for p in pts], [p["samples_per_s"] for p in pts], "o-", color="#2a7ab9")
        for p in pts:
            ax.annotate(f"{p['samples_per_s']:.0f}/s, {p.get('peak_rss_mib', 0):.0f} MiB",
                        (p["samples"], p["samples_per_s"]),
                        fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xticks([p["samples"] for p in pts])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, max(p["samples_per_s"] for p in pts) * 1.3)
        ax.set_xlabel("samples (Dolly replicated), one process each")
        ax.set_ylabel("data preparation samples / s")
        fit = prep.get("linear_fit") or {}
        ax.set_title(f"plugtune data prep: {fit.get('per_sample_ms')} ms/sample + {fit.get('fixed_s')} s, "
                     f"R² {fit.get('r2')}", fontsize=9)
    fig.suptitle(f"plugtune bench {results['name']} ({results['meta']['torch_threads']} torch threads, "
                 f"load {results['meta']['loadavg_start'][0]} at start)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--name", help="results name (default: a UTC timestamp)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (plugtune always runs)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--sequence-len", type=int, default=512)
    p.add_argument("--rows-per-batch", type=int, default=4, help="packed rows per micro-batch")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply measured steps")
    p.add_argument("--logging-steps", type=int, default=None,
                   help="Trainer logging interval in every run (default: each tool's own: plugtune "
                        "5, TRL 10); losses are recorded every step regardless")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per method, order reversed each round (ABBA); the best round counts")
    p.add_argument("--quick", action="store_true", help="a short smoke run (steps / 4, no 16x prep)")
    p.add_argument("--prep-samples", default="1000,10000,100000",
                   help="data-preparation sizes (Dolly replicated), one process each")
    p.add_argument("--no-prep", action="store_true")
    p.add_argument("--real-batches", action="store_true",
                   help="(a)/(d) pack rows of sequence_len (multipack_real_batches: true, plugtune's "
                        "default) instead of one row of rows_per_batch * sequence_len per micro-batch")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (models, logs)")
    args = p.parse_args(argv)
    if args.worker:
        from workloads import worker_main

        worker_main(args.worker)
        return 0

    t_all = time.perf_counter()
    shared = shared_dir()
    if not (shared / "data").is_dir():
        print(f"bench: {shared / 'data'} not found (set PLUGTUNE_SHARED)", file=sys.stderr)
        return 2
    name = args.name or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    scale = args.steps_scale / (4 if args.quick else 1)
    if args.quick:
        args.rounds = 1
    prep_sizes = [int(x) for x in args.prep_samples.split(",")] if not args.no_prep else []
    if args.quick:
        prep_sizes = [s for s in prep_sizes if s <= 10000]
    methods = ["plugtune"] + [m for m in args.methods.split(",") if m in METHODS and m != "plugtune"]
    tmp = Path(tempfile.mkdtemp(prefix="plugtune-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PLUGTUNE_SHARED": str(shared), "PLUGTUNE_HOME": str(tmp / "home"),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    os.environ.update({k: env[k] for k in ("PLUGTUNE_SHARED", "TOKENIZERS_PARALLELISM")})
    import torch
    import transformers
    import trl

    results: dict = {"name": name, "meta": {
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
        "machine": platform.machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "targets": TARGETS, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": [Path(d["path"]).name for d in data_files(shared)]}, "models": {}}
    try:
        results["meta"]["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    for model_name in [m for m in args.models.split(",") if m]:
        if model_name not in MODELS:
            raise SystemExit(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
        mcfg = MODELS[model_name]
        if model_name == "llama-20m":
            info = build_llama_20m(tmp / "llama-20m")
        elif model_name == "smollm2-135m":
            info = build_smollm2(shared, tmp / "smollm2-135m")
        else:
            path = shared / "data" / "models" / "stories260K" / "hf"
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), "pt") as f:
                params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
            info = {"path": str(path), "params": params}
        min_steps = mcfg.get("min_steps", 4)
        steps = max(min_steps, round(MODELS[model_name]["steps"] * scale))
        warm = MODELS[model_name]["warmup"]
        files, kept = fitting_data(data_files(shared), info["path"], args.sequence_len,
                                   tmp / f"data-{model_name}")
        info["samples_kept_of_total"] = kept
        rows_per_batch = mcfg.get("rows_per_batch", args.rows_per_batch)
        base = {"model_name": model_name, "model_dir": info["path"], "datasets": files,
                "sequence_len": args.sequence_len, "rows_per_batch": rows_per_batch,
                "steps": steps, "warmup": warm, "threads": args.threads,
                "logging_steps": args.logging_steps, "adapter": mcfg.get("adapter", "none"),
                "long_rows": not args.real_batches}
        runs: dict = {}
        every: dict = {m: [] for m in methods}
        print(f"bench: {model_name}: {info['params'] / 1e6:.2f}M params, {warm}+{steps} steps, samples "
              f"that fit sequence_len {args.sequence_len}: {kept}", flush=True)
        batching: dict = {}
        for rnd in range(args.rounds):
            # ABBA: reverse the order each round so a drifting background load hits all alike
            order = methods if rnd % 2 == 0 else list(reversed(methods))
            for meth in order:
                cfg = {**base, "method": meth}
                if meth == "trl_default":
                    if not batching:  # from round 1's (a), which always runs before (b)
                        a = every["plugtune"][0]
                        mb, ga = padded_batching(a["real_tokens_per_step"], a["mean_sample_len"])
                        batching = {"micro_batch": mb, "grad_accum": ga}
                    cfg.update(batching)
                elif meth == "trl_packing":
                    # TRL's padding-free collator concatenates a micro-batch into ONE row; CPU
                    # sdpa has no varlen kernel, so 4 rows per micro-batch pay (4*512)^2
                    # attention (3x slower than this). One row per micro-batch, accumulated
                    # to the same tokens per optimizer step, is TRL's best layout here.
                    cfg.update(micro_batch=1, grad_accum=rows_per_batch)
                elif meth == "bare_loop":
                    if rnd > 0:  # one process alternates (d) and (a) itself: no rounds needed
                        continue
                    cfg.update(steps=max(min_steps, round(MODELS[model_name]["inproc_steps"] * scale)))
                r = run_worker({**cfg, "round": rnd}, tmp, env, args.timeout)
                r["round"] = rnd
                every[meth].append(r)
                print(f"bench: {model_name} round {rnd + 1} ({LETTER[meth]}) {meth}: "
                      f"{r['real_tokens_per_s']:.0f} real tok/s (median step {r['real_tokens_per_s_median']:.0f}), "
                      f"pad {100 * r['pad_fraction']:.1f}%, {r['real_tokens_per_step']:.0f} tok/step, "
                      f"first step after {r['time_to_first_step_s']:.1f}s, RSS {r['peak_rss_mib']:.0f} MiB "
                      f"({r['wall_s']:.0f}s wall, load {os.getloadavg()[0]:.1f})", flush=True)
        for meth, rs in every.items():
            runs[meth] = best_of(rs)
        rat = ratios({k: v["real_tokens_per_s"] for k, v in runs.items()})
        rat_med = ratios({k: v["real_tokens_per_s_median"] for k, v in runs.items()})
        same = runs.get("bare_loop", {}).get("same_process")
        if same:  # a/d from (a) and (d) alternating in one process on the same batches
            rat["a/d_across_processes"] = rat["a/d"]
            rat["a/d"] = same["a/d"]
            rat_med.pop("a/d", None)
        # memory side by side: plugtune's peak RSS over each other run's (below 1 = less memory)
        rss = ratios({k: v["peak_rss_mib"] for k, v in runs.items()})
        ceiling = a_c_ceiling(runs, base["adapter"] != "none")
        if ceiling:
            print(f"bench: {model_name}: a/c explained by arithmetic per token {ceiling['a_c_ceiling']}", flush=True)
        results["models"][model_name] = {
            **{k: v for k, v in info.items() if k != "path"}, "path": info["path"] if model_name != "llama-20m" else "built from config",
            "sequence_len": args.sequence_len, "rows_per_batch": rows_per_batch,
            "multipack_real_batches": not base["long_rows"], "adapter": base["adapter"], "measured_steps": steps, "warmup_steps": warm, "runs": runs, "ratios": rat,
            "ratios_from_median_step": rat_med, "peak_rss_ratios": rss, "rounds": args.rounds,
            "a_c_flop_ceiling": ceiling,
            "all_rounds": {m: [{k: r[k] for k in ("round", "real_tokens_per_s", "real_tokens_per_s_median",
                                                   "time_to_first_step_s", "peak_rss_mib", "loadavg_end")}
                               for r in rs] for m, rs in every.items()},
            "targets_met": verdicts(rat, runs["plugtune"]["pad_fraction"])}
    first = next(iter(results["models"].values()), None)
    if first:
        results.update(first["ratios"])
        results["ratios_model"] = next(iter(results["models"]))
    if prep_sizes:
        model_dir = str(tmp / "llama-20m") if (tmp / "llama-20m").exists() else str(build_llama_20m(tmp / "llama-20m")["path"])
        prep = {"method": "prep_scaling", "points": [], "process_per_size": True}
        for n in prep_sizes:  # one process per size: its peak RSS is that size's alone
            cfg = {"method": "prep_scaling", "model_name": f"prep{n}", "model_dir": model_dir,
                   "dolly_file": data_files(shared)[0]["path"], "samples": [n],
                   "sequence_len": args.sequence_len, "threads": args.threads, "repeats": 1}
            try:
                prep["points"] += run_worker(cfg, tmp, env, args.timeout)["points"]
            except RuntimeError as exc:  # e.g. past --timeout on a loaded machine: keep the rest
                prep.setdefault("failed", []).append({"samples": n, "error": str(exc)[:300]})
                print(f"bench: data prep {n} samples failed: {str(exc)[:200]}", flush=True)
                continue
            print(f"bench: data prep {n} samples: {prep['points'][-1]['samples_per_s']:.0f}/s, "
                  f"peak RSS {prep['points'][-1]['peak_rss_mib']:.0f} MiB", flush=True)
        prep["linearity"] = linearity([(p["samples"], p["seconds"]) for p in prep["points"]])
        prep["linear_fit"] = linear_fit([(p["samples"], p["seconds"]) for p in prep["points"]])
        results["prep_scaling"] = prep
        print("bench: data prep: " + ", ".join(f"{p['scale']}x {p['samples']} samples {p['samples_per_s']:.0f}/s"
                                               for p in prep["points"]) + f" (linearity {prep['linearity']})")
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["total_s"] = round(time.perf_counter() - t_all, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = summarize(results["models"])
    if "prep_scaling" in results:
        pr = results["prep_scaling"]
        md += "\n### data preparation (plugtune, Dolly replicated, llama2 tokenizer, packing on)\n\n" + table(
            [{**p, "phases": ", ".join(f"{k} {v:.1f}s" for k, v in p["phases_s"].items())} for p in pr["points"]],
            [("scale", "x Dolly", ""), ("samples", "samples", ""), ("seconds", "s", ".2f"),
             ("samples_per_s", "samples/s", ".0f"), ("ms_per_sample", "ms/sample", ".2f"),
             ("peak_rss_mib", "peak RSS MiB", ".0f"), ("phases", "phases", "")])
        md += (f"\n\nsamples/s at the largest size / at the smallest: {pr['linearity']}; least-squares "
               f"fit seconds = fixed + samples x per-sample: {pr['linear_fit']}\n")
    md += (f"\nload average {results['meta']['loadavg_start']} at start, {results['meta']['loadavg_end']} at end; "
           f"{os.cpu_count()} CPUs, {args.threads} torch threads; total {results['meta']['total_s']:.0f}s\n")
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / f"{name}.md").write_text(md)
    chart(results, out_dir / f"{name}.png")
    print("\n" + md)
    print(f"bench: wrote {out_dir / (name + '.json')}, .md and .png")
    if args.keep_tmp:
        print(f"bench: models, data and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


if __name__ == "__main__":
    raise SystemExit(main())
