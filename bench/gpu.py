"""GPU training benchmark (issue 18): plugtune vs TRL SFTTrainer (padding-free packing) vs TRL +
Liger on Llama-architecture models at 1B and 8B shapes, bf16, LoRA and QLoRA, packed rows of
2048 and 4096 tokens. One JSON: real tokens/s, peak GPU memory, MFU per run.

    python bench/gpu.py --plan                 # the run matrix and the wheels this machine lacks
    python bench/gpu.py                        # measure (one CUDA GPU; < 8 min on one H100)
    python bench/gpu.py --shapes 1b --seq 2048 # a subset
    python bench/gpu.py --download-wheels DIR  # on a networked machine: fetch the missing wheels
                                               # (<= 64 MiB in all) to carry to an offline one

Runs, each in its own process (fresh CUDA memory, so peak memory is that run's alone), on the
same synthetic packed data (same samples, same tokens per optimizer step, same steps):

  plugtune         ``plugtune.train`` with ``sample_packing`` (best-fit rows, position ids restart
                   per sample) and ``flash_attention: true`` (flash-attn varlen when installed)
  plugtune_liger   the same with ``liger_kernel: true`` (Liger's fused linear cross-entropy
                   instead of plugtune's label-only LM head)
  trl_packing      TRL ``SFTTrainer(packing=True)``: best-fit, padding-free (flattened) rows
  trl_liger        the same with ``use_liger_kernel=True``

All: bf16, gradient checkpointing (non-reentrant), LoRA r16 all-linear (QLoRA: NF4 double-quant
base), fused AdamW, micro-batch = one row of ``seq`` tokens, 4 accumulation steps. Models are
built from configs (random weights: throughput and memory do not depend on the values) and saved
once to local disk so every run loads the same folder. The tokenizer is a word-level one made
here whose words are token ids, so text data maps to chosen ids without a real tokenizer file.

MFU = real tokens/s x model FLOPs per token / the GPU's peak dense bf16 FLOP/s, with model FLOPs
per token = 6 N + 12 L d s (PaLM appendix B; N = all parameters, s = mean attended length; the
recompute of gradient checkpointing is not counted). With LoRA the frozen weights get no weight
gradients, so about a third of 6N is not executed: MFU here is comparable between runs, and
with what unsloth/axolotl quote, not a hardware utilisation.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Llama 3.2 1B / Llama 3.1 8B shapes (their published config.json values)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192),
}
METHODS = ("plugtune", "plugtune_liger", "trl_packing", "trl_liger")
ADAPTERS = ("lora", "qlora")
SEQS = (2048, 4096)

#: peak dense bf16 tensor FLOP/s by device-name substring (vendor data sheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "4090": 165e12}

#: distributions the GPU run imports beside torch and transformers: (name, needed for, optional)
WHEELS = (
    ("plugtune deps: pluggy, pydantic, pyyaml, rich, safetensors", "plugtune", False),
    ("peft", "LoRA / QLoRA", False),
    ("accelerate", "Trainer", False),
    ("datasets", "data pipeline (pulls pyarrow, pandas, dill, multiprocess, xxhash, fsspec)", False),
    ("trl", "TRL runs", False),
    ("liger-kernel", "plugtune_liger, trl_liger (Triton ships with CUDA torch)", True),
    ("bitsandbytes", "QLoRA runs", True),
    ("flash-attn", "varlen attention of packed rows (else sdpa)", True),
)
IMPORT_NAME = {"liger-kernel": "liger_kernel", "flash-attn": "flash_attn", "pyyaml": "yaml"}
CARRY_LIMIT_MIB = 64


# ---------------------------------------------------------------------------------------------
# pure parts (CPU-tested in bench/test_gpu.py)


def llama_config(shape: str):
    """A ``LlamaConfig`` of ``shape`` (``1b`` / ``8b``). Raises ``KeyError`` for others."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)


def param_count(shape: str) -> int:
    """Parameters of ``shape`` from its config (embeddings, attention with GQA, SwiGLU MLP,
    RMSNorms, untied head)."""
    c = SHAPES[shape]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if c["tie_word_embeddings"] else 2) + n * per_layer + h


def flops_per_token(shape: str, mean_attended: float) -> float:
    """Model FLOPs per trained token: ``6 N + 12 L d s`` (forward + backward, PaLM app. B)."""
    c = SHAPES[shape]
    return 6 * param_count(shape) + 12 * c["num_hidden_layers"] * c["hidden_size"] * mean_attended


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device by its name, ``None`` when unknown."""
    for key, val in PEAK_BF16.items():
        if key.lower() in device_name.lower():
            return val
    return None


def mfu(tokens_per_s: float, flops_tok: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], ``None`` without a known peak."""
    return None if not peak or tokens_per_s <= 0 else tokens_per_s * flops_tok / peak


def installed(dist: str) -> bool:
    """Whether a distribution (or, for the plugtune-deps line, all of them) is importable."""
    if dist.startswith("plugtune deps"):
        return all(installed(d) for d in ("pluggy", "pydantic", "pyyaml", "rich", "safetensors"))
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(IMPORT_NAME.get(dist, dist.replace("-", "_"))) is not None


def missing_wheels(is_installed=installed) -> list[dict]:
    """The :data:`WHEELS` entries this environment lacks, each ``{name, for, optional}``."""
    return [{"name": n, "for": f, "optional": o} for n, f, o in WHEELS if not is_installed(n)]


def carry_check(sizes_bytes: dict[str, int], limit_mib: int = CARRY_LIMIT_MIB) -> dict:
    """``{"total_mib", "ok", "largest"}`` for wheel files to carry (``limit_mib`` in all)."""
    total = sum(sizes_bytes.values())
    largest = sorted(sizes_bytes, key=sizes_bytes.get, reverse=True)[:3]
    return {"total_mib": round(total / 2**20, 1), "ok": total <= limit_mib * 2**20, "largest": largest}


def plan(shapes, adapters, seqs, methods, cuda: bool, have=installed) -> list[dict]:
    """Every run of the matrix with ``skip`` = the reason it cannot run here (``None`` = runs).

    Order: small to large (1B before 8B, LoRA before QLoRA, 2048 before 4096), so a time budget
    cuts the largest runs first.
    """
    runs = []
    for shape in shapes:
        for adapter in adapters:
            for seq in seqs:
                for m in methods:
                    skip = None
                    if not cuda:
                        skip = "no CUDA device"
                    elif "liger" in m and not have("liger-kernel"):
                        skip = "liger-kernel not installed"
                    elif adapter == "qlora" and not have("bitsandbytes"):
                        skip = "bitsandbytes not installed"
                    elif m.startswith("trl") and not have("trl"):
                        skip = "trl not installed"
                    runs.append({"shape": shape, "adapter": adapter, "seq": seq, "method": m,
                                 "skip": skip})
    return runs


def synthetic_samples(n: int, vocab: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion samples of word-ids (``"w17 w9 ..."``), lengths log-normal around
    ~1/8 of ``seq`` (clipped to [16, seq/2]) like instruction data; the same for every method."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = int(min(seq // 2, max(16, rng.lognormvariate(math.log(seq / 8), 0.7))))
        p = max(4, int(total * rng.uniform(0.2, 0.6)))
        words = [f"w{rng.randrange(8, vocab - TEMPLATE_IDS)}" for _ in range(total)]
        out.append({"prompt": " ".join(words[:p]), "completion": " ".join(words[p:])})
    return out


#: the top ids of the synthetic vocabulary hold the alpaca template's words (never sampled)
TEMPLATE_IDS = 128


def template_words() -> list[str]:
    """The words the ``alpaca`` template writes around a sample (Stanford's preambles and the
    ``### Instruction/Input/Response:`` headers), split as the ``Whitespace`` pre-tokenizer does."""
    import re

    from plugtune.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    text = f"{ALPACA_PREAMBLE} {ALPACA_PREAMBLE_INPUT} ### Instruction: ### Input: ### Response:"
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text)))


def make_tokenizer(vocab: int, dest: Path):
    """A word-level tokenizer whose word ``w{i}`` is token ``i`` (after 4 specials), with the
    alpaca template's words in the top :data:`TEMPLATE_IDS` ids, saved to ``dest``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = template_words()
    assert len(words) <= TEMPLATE_IDS, len(words)
    table = {t: i for i, t in enumerate(specials)}
    table.update({f"w{i}": i for i in range(len(specials), vocab - TEMPLATE_IDS)})
    table.update({w: vocab - TEMPLATE_IDS + j for j, w in enumerate(words)})
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(dest)
    return fast


# ---------------------------------------------------------------------------------------------
# the GPU side


def build_model(shape: str, dest: Path) -> None:
    """Random ``shape`` weights in bf16 built on the GPU, saved as safetensors to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    make_tokenizer(SHAPES[shape]["vocab_size"], dest)
    del model
    torch.cuda.empty_cache()


def _worker(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from measure import steady_throughput
    from workloads import LORA, TokenCounter, _step_clock  # the CPU bench's step clock

    torch.cuda.reset_peak_memory_stats()
    counter, record = TokenCounter(), {}
    flash = installed("flash-attn")
    data = Path(cfg["data"])
    steps = cfg["warmup"] + cfg["steps"]
    with tempfile.TemporaryDirectory() as out:
        if cfg["method"].startswith("plugtune"):
            import plugtune.train as pt
            import plugtune.trainer as ptr
            from plugtune.config import validate_recipe

            base = ptr.PlugtuneTrainer

            class Measured(base):
                def __init__(self, *a, data_collator=None, callbacks=None, **kw):
                    super().__init__(*a, data_collator=counter.wrap(data_collator),
                                     callbacks=[*(callbacks or []), _step_clock(counter, record)], **kw)

            ptr.PlugtuneTrainer = Measured
            pt.train(validate_recipe(dict(
                base_model=cfg["model_dir"], adapter=cfg["adapter"], dtype="bf16",
                lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                lora_target_modules=LORA["targets"], sample_packing=True, sequence_len=cfg["seq"],
                micro_batch_size=1, gradient_accumulation_steps=cfg["accum"], max_steps=steps,
                chat_template="alpaca", datasets=[{"path": str(data), "type": "completion"}],
                flash_attention=flash, liger_kernel=cfg["method"] == "plugtune_liger",
                gradient_checkpointing=True, output_dir=out, save_total_limit=1,
                logging_steps=10, learning_rate=2e-4)))
        else:
            from datasets import load_dataset
            from peft import LoraConfig
            from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
            from trl import SFTConfig, SFTTrainer

            from plugtune.data.templates import ensure_chat_template

            tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
            ensure_chat_template(tok, "alpaca")
            qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
                  if cfg["adapter"] == "qlora" else None)
            model = AutoModelForCausalLM.from_pretrained(
                cfg["model_dir"], dtype=torch.bfloat16, quantization_config=qc,
                attn_implementation="flash_attention_2" if flash else "sdpa", device_map={"": 0})
            ds = load_dataset("json", data_files=str(data), split="train")
            ds = ds.map(lambda ex: {"prompt": [{"role": "user", "content": ex["prompt"]}],
                                    "completion": [{"role": "assistant", "content": ex["completion"]}]},
                        remove_columns=ds.column_names)
            args = SFTConfig(output_dir=out, max_steps=steps, report_to="none", save_strategy="no",
                             bf16=True, gradient_checkpointing=True, packing=True,
                             padding_free=True, max_length=cfg["seq"], per_device_train_batch_size=1,
                             gradient_accumulation_steps=cfg["accum"], learning_rate=2e-4,
                             use_liger_kernel=cfg["method"] == "trl_liger", logging_steps=10)
            peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules=LORA["targets"], task_type="CAUSAL_LM")
            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft, callbacks=[_step_clock(counter, record)])
            trainer.data_collator = counter.wrap(trainer.data_collator)
            trainer.train()
    thr = steady_throughput(record["step_end_s"], record["cum_real"], cfg["warmup"])
    return {"real_tokens_per_s": round(thr["tokens_per_s"], 1),
            "real_tokens_per_s_median": round(thr["tokens_per_s_median"], 1),
            "s_per_step": round(thr["s_per_step"], 3), "real_tokens_per_step": round(thr["tokens_per_step"]),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "flash_attn": flash}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--plan", action="store_true", help="print the run matrix and missing wheels")
    p.add_argument("--download-wheels", metavar="DIR", help="pip download the missing wheels")
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--adapters", default="lora,qlora")
    p.add_argument("--seq", default="2048,4096")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--accum", type=int, default=4, help="rows (micro-batches) per optimizer step")
    p.add_argument("--budget-s", type=float, default=450, help="skip runs that would pass this")
    p.add_argument("--out", default=str(HERE / "results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"))
    args = p.parse_args(argv)
    if args.worker:
        cfg = json.loads(Path(args.worker).read_text())
        Path(cfg["result"]).write_text(json.dumps(_worker(cfg)))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    runs = plan(args.shapes.split(","), args.adapters.split(","), [int(s) for s in args.seq.split(",")],
                args.methods.split(","), cuda)
    missing = missing_wheels()
    if args.download_wheels:
        names = [n for w in missing for n in (["pluggy", "pydantic", "pyyaml", "rich", "safetensors"]
                                               if w["name"].startswith("plugtune deps") else [w["name"]])]
        dest = Path(args.download_wheels)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(dest), *names], check=False)
        chk = carry_check({f.name: f.stat().st_size for f in dest.glob("*.whl")})
        print(json.dumps(chk))
        return 0 if chk["ok"] else 1
    if args.plan or not cuda:
        print(json.dumps({"cuda": cuda, "missing_wheels": missing, "runs": runs}, indent=1))
        if not cuda and not args.plan:
            print("bench/gpu.py: no CUDA device here: nothing measured (the CPU benchmark is "
                  "bench/run.py)", file=sys.stderr)
            return 2
        return 0
    sys.path.insert(0, str(ROOT / "packages" / "core" / "src"))  # a checkout without installs
    sys.path.insert(0, str(ROOT / "packages" / "plugin-llama" / "src"))
    dev = torch.cuda.get_device_name(0)
    peak = peak_flops(dev)
    tmp = Path(tempfile.mkdtemp(prefix="plugtune-gpu-"))
    t0 = time.perf_counter()
    results = {"device": dev, "peak_bf16_flops": peak, "torch": torch.__version__,
               "missing_wheels": missing, "command": "python bench/gpu.py " + " ".join(argv or sys.argv[1:]),
               "runs": []}
    built: set[str] = set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "packages" / "core" / "src"), str(ROOT / "packages" / "plugin-llama" / "src"),
         os.environ.get("PYTHONPATH", "")]), "TOKENIZERS_PARALLELISM": "false"}
    per_run: list[float] = []
    mean_len: dict[int, float] = {}
    for r in runs:
        if r["skip"]:
            results["runs"].append(r)
            continue
        elapsed = time.perf_counter() - t0
        if per_run and elapsed + max(per_run) * (8 if r["shape"] == "8b" else 1) > args.budget_s:
            results["runs"].append({**r, "skip": f"time budget ({args.budget_s:.0f} s)"})
            continue
        mdir = tmp / r["shape"]
        if r["shape"] not in built:
            build_model(r["shape"], mdir)
            built.add(r["shape"])
        data = tmp / f"data-{r['seq']}.jsonl"
        if not data.exists():
            rows = synthetic_samples(4000, SHAPES[r["shape"]]["vocab_size"], r["seq"])
            data.write_text("".join(json.dumps(x) + "\n" for x in rows))
            mean_len[r["seq"]] = sum(len((x["prompt"] + " " + x["completion"]).split())
                                     for x in rows) / len(rows)
        cfg = {**r, "model_dir": str(mdir), "data": str(data), "steps": args.steps,
               "warmup": args.warmup, "accum": args.accum, "result": str(tmp / "r.json")}
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(tmp / "cfg.json")], env=env,
                              capture_output=True, text=True)
        per_run.append(time.perf_counter() - t)
        if proc.returncode:
            results["runs"].append({**r, "error": proc.stderr[-2000:]})
            continue
        res = json.loads((tmp / "r.json").read_text())
        fl = flops_per_token(r["shape"], mean_len[r["seq"]])
        res["mfu"] = None if mfu(res["real_tokens_per_s"], fl, peak) is None else round(
            mfu(res["real_tokens_per_s"], fl, peak), 4)
        res["wall_s"] = round(per_run[-1], 1)
        results["runs"].append({**r, **res})
        print(json.dumps(results["runs"][-1]), flush=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"bench/gpu.py: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
