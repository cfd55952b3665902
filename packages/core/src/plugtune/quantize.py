"""Post-training quantization for deployment and a comparison report (``plugtune quantize``).

Methods:

* ``bnb4``: bitsandbytes NF4 with double quantization (Dettmers et al. 2023, arXiv:2305.14314),
  weights quantized when loaded; runs on CUDA and (bitsandbytes >= 0.45) on CPU.
* ``bnb8``: bitsandbytes LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339).
* ``gptq``: GPTQ (Frantar et al. 2022, arXiv:2210.17323) through ``transformers.GPTQConfig``
  and ``gptqmodel``; calibrates on held-out text and needs a CUDA GPU. On a machine without
  CUDA or without gptqmodel it stops with :class:`QuantizeError` saying which is missing.

The report compares the full-precision reference with the quantized model on: size on disk
(bytes of ``*.safetensors``), perplexity on held-out text (exp of the mean NLL over the answer
tokens of the held-out rows, as ``plugtune eval``), and greedy generation speed (new tokens per
second over a fixed number of new tokens per prompt, after one warm-up call).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from plugtune.merge import check_out_dir, load_for_merge, publish_dir

METHODS = ("bnb4", "bnb8", "gptq")


class QuantizeError(RuntimeError):
    """The quantization cannot run here (missing CUDA / package) or its input is unusable."""


def check_method_available(method: str) -> None:
    """Raise :class:`QuantizeError` when ``method`` cannot run on this machine (says why)."""
    if method not in METHODS:
        raise QuantizeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "gptq":
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (this machine has none)")
        if importlib.util.find_spec("gptqmodel") is None:
            missing.append("the gptqmodel package (pip install gptqmodel)")
        if missing:
            raise QuantizeError(
                "GPTQ quantization needs " + " and ".join(missing) + "; it is not run on CPU. "
                "Use --method bnb4 or --method bnb8 here, or run on a CUDA machine.")
    elif importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizeError(f"{method} needs bitsandbytes: pip install 'plugtune[quant]'")


def _compute_dtype() -> torch.dtype:
    from plugtune.spec import cuda_supports_bf16

    return torch.bfloat16 if cuda_supports_bf16() else torch.float32


def quantization_config(method: str, tokenizer=None, calibration: list[str] | None = None):
    """The ``transformers`` quantization config for ``method`` (bnb4, bnb8 or gptq, 4-bit)."""
    from transformers import BitsAndBytesConfig

    if method == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=_compute_dtype())
    if method == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, group_size=128, dataset=calibration, tokenizer=tokenizer)


def size_on_disk(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in ``folder``."""
    p = Path(folder)
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))


@torch.no_grad()
def perplexity(model, rows: list[dict], batch_size: int = 8) -> float:
    """``exp(mean NLL)`` over the label tokens (``labels != -100``) of tokenized rows.

    Rows carry ``input_ids`` and ``labels`` (lists of ints, as from :func:`plugtune.data.prepare`).
    Forward with ``use_cache=False``; the loss of each batch is summed per token.
    """
    from plugtune.data.collate import Collator

    device = next(model.parameters()).device
    collate = Collator(pad_token_id=0)
    total, count = 0.0, 0
    for k in range(0, len(rows), batch_size):
        batch = collate(rows[k:k + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        out = model(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    labels=batch["labels"].to(device), use_cache=False)
        total += float(out.loss) * n
        count += n
    if count == 0:
        raise QuantizeError("no label tokens in the held-out rows")
    return math.exp(min(total / count, 50))


@torch.no_grad()
def generation_speed(model, tokenizer, prompts: list, max_new_tokens: int = 32,
                     max_prompt_tokens: int = 128) -> float:
    """Greedy new tokens per second: every prompt (its last ``max_prompt_tokens`` tokens)
    generates exactly ``max_new_tokens``."""
    from plugtune.modeling import prompt_texts

    texts = prompt_texts(tokenizer, prompts)
    device = next(model.parameters()).device
    side, tside = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # keep the generation prompt
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens).to(device)
        kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
        model.generate(**{k: v[:1, :8] for k, v in enc.items()}, **{**kw, "max_new_tokens": 2,
                                                                     "min_new_tokens": 2})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    new = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return new / dt


def _held_out(source: Path, tokenizer, eval_data: str | None, eval_type: str | None,
              max_samples: int, task: str):
    """Tokenized held-out rows and prompts: ``--eval-data`` or the run's test/val data."""
    import yaml

    from plugtune.config import DatasetConfig, validate_recipe
    from plugtune.data import prepare

    rp = source / "recipe.yaml"
    recipe = None
    if rp.is_file():
        recipe = validate_recipe(yaml.safe_load(rp.read_text()) or {}, source=str(rp))
    if eval_data:
        dtype = eval_type or (recipe.datasets[0].type if recipe else None)
        if dtype is None:
            raise QuantizeError("--eval-data needs --type (alpaca, dolly, completion, text, ...)")
        test = [DatasetConfig(path=eval_data, type=dtype, max_samples=max_samples)]
    elif recipe is not None and recipe.test_datasets:
        test = [d.model_copy(update={"max_samples": max_samples}) for d in recipe.test_datasets]
    else:
        raise QuantizeError(
            f"{source}: no held-out text for the perplexity: pass --eval-data FILE --type T "
            "(the run's recipe has no test_datasets)")
    base = recipe.model_dump() if recipe else {"base_model": str(source)}
    base.update(datasets=[d.model_dump() for d in test], test_datasets=[], val_set_size=0,
                sample_packing=False, rl=None)
    rec = validate_recipe(base)
    if test[0].type == "preference":
        raise QuantizeError("held-out text for perplexity must not be preference pairs")
    data = prepare(rec, tokenizer, task)
    rows = [data.train[i] for i in range(len(data.train))]
    prompts = []
    for ex in data.raw_train.select(range(min(4, len(data.raw_train)))):
        if ex.get("messages"):
            msgs = ex["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompts.append(msgs[:last])
        elif ex.get("text"):
            prompts.append(ex["text"][:200])
    return rows, prompts or ["Once upon a time"]


def quantize(source: str | Path, method: str, out_dir: str | Path, force: bool = False,
             eval_data: str | None = None, eval_type: str | None = None, max_samples: int = 32,
             max_new_tokens: int = 32, console=None) -> dict[str, Any]:
    """Quantize a run (adapter merged first) or a model folder and compare it with full precision.

    Args:
        source: a ``plugtune train`` run directory or a ``transformers`` model folder.
        method: ``bnb4``, ``bnb8`` or ``gptq``.
        out_dir: where the quantized model is written (atomically; ``force`` to replace a
            non-empty folder).
        eval_data / eval_type: held-out file and its format (default: the run's
            ``test_datasets``); ``max_samples`` rows of it are scored.

    Returns:
        The report (also written to ``out_dir/quantize_report.json``): for ``reference`` and
        ``quantized``: ``size_bytes``, ``perplexity``, ``tokens_per_second``; plus ratios.

    Raises:
        QuantizeError: the method cannot run here (e.g. GPTQ without CUDA), no held-out data.
        plugtune.merge.MergeError: an unusable run directory or a non-empty ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_method_available(method)
    src = Path(source)
    out = Path(out_dir)
    check_out_dir(out, force)
    work = Path(tempfile.mkdtemp(prefix="plugtune-quantize-"))
    try:
        if (src / "recipe.yaml").is_file():  # a run: merge (adapter) and save full precision
            model, tok, spec, _ = load_for_merge(src, dtype="auto")
            task = spec.task
            ref_dir = work / "reference"
            model.save_pretrained(ref_dir, safe_serialization=True)
            tok.save_pretrained(ref_dir)
            del model
        elif (src / "config.json").is_file():
            ref_dir, task = src, "causal"
            if json.loads((src / "config.json").read_text()).get("is_encoder_decoder"):
                task = "seq2seq"
        else:
            raise QuantizeError(f"{src} is neither a plugtune run nor a model folder")
        auto = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
        tok = AutoTokenizer.from_pretrained(ref_dir)
        from plugtune.modeling import ensure_pad_token

        ensure_pad_token(tok)
        rows, prompts = _held_out(src, tok, eval_data, eval_type, max_samples, task)
        calib = None
        if method == "gptq":
            calib = [tok.decode(r["input_ids"], skip_special_tokens=True) for r in rows]
        device_map = "auto" if torch.cuda.is_available() else None
        reference = auto.from_pretrained(ref_dir, dtype=_compute_dtype(), device_map=device_map)
        report: dict[str, Any] = {"method": method, "source": str(src), "rows": len(rows),
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}
        report["reference"] = {
            "dtype": str(_compute_dtype()).replace("torch.", ""),
            "size_bytes": size_on_disk(ref_dir),
            "perplexity": round(perplexity(reference.eval(), rows), 4),
            "tokens_per_second": round(generation_speed(reference, tok, prompts, max_new_tokens), 1),
        }
        del reference
        qcfg = quantization_config(method, tok, calib)
        qmodel = auto.from_pretrained(ref_dir, dtype=_compute_dtype(), quantization_config=qcfg,
                                      device_map=device_map)
        if method == "bnb4" and not torch.cuda.is_available():
            from plugtune.kbit import cpu_4bit_fallback

            cpu_4bit_fallback(qmodel)  # shapes the packed CPU kernel cannot take: de-quantized path
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            qmodel.save_pretrained(staging, safe_serialization=True)
            tok.save_pretrained(staging)
            report["quantized"] = {
                "size_bytes": size_on_disk(staging),
                "perplexity": round(perplexity(qmodel.eval(), rows), 4),
                "tokens_per_second": round(generation_speed(qmodel, tok, prompts, max_new_tokens), 1),
            }
            r, q = report["reference"], report["quantized"]
            report["size_ratio"] = round(q["size_bytes"] / max(r["size_bytes"], 1), 4)
            report["perplexity_change"] = round(q["perplexity"] / r["perplexity"] - 1, 4)
            report["speed_ratio"] = round(q["tokens_per_second"] / max(r["tokens_per_second"], 1e-9), 3)
            (staging / "quantize_report.json").write_text(json.dumps(report, indent=2))
            publish_dir(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
