"""Merge a run's adapter into its base and export a standalone model (``plugtune merge``).

The output folder holds plain ``transformers`` weights (safetensors), the run's tokenizer (with
its chat template) and ``plugtune_merge.json`` (provenance); ``AutoModelForCausalLM`` (or
``AutoModelForSeq2SeqLM`` for encoder-decoder families) loads it without peft or plugtune.

Adapters trained on a quantized base (QLoRA: NF4 4-bit; or 8-bit) are never merged into
quantized weights (that would round the merged weights back to 4 bits and lose most of the
update). Two choices of full-precision base:

* ``base="dequantized"`` (default): load the base exactly as in training (4-bit), dequantize it
  (``PreTrainedModel.dequantize``), then merge. The merged model computes what was trained:
  ``dequant(quant(W)) + (alpha / r) * B @ A``.
* ``base="original"``: reload the original full-precision weights ``W`` and merge into them.
  The adapter then sits on weights it was not trained with; the difference is the quantization
  error of ``W`` (NF4: Dettmers et al. 2023, arXiv:2305.14314).

Both are written in the requested dtype (``fp32`` / ``bf16`` / ``fp16``; ``auto``: bf16 on CUDA
with bf16, else fp32). Outputs are written to a temporary sibling folder and renamed into place;
a non-empty ``OUT_DIR`` is only replaced with ``force=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from plugtune.config import RecipeError, validate_recipe
from plugtune.spec import resolve_dtype

BASES = ("dequantized", "original")


class MergeError(RuntimeError):
    """The merge cannot be done (bad run directory, existing output, unsupported adapter)."""


def _read_recipe(run: Path):
    rp = run / "recipe.yaml"
    if not rp.is_file():
        raise MergeError(f"{run} is not a plugtune run directory (no recipe.yaml)")
    try:
        return validate_recipe(yaml.safe_load(rp.read_text()) or {}, source=str(rp))
    except RecipeError as exc:
        raise MergeError(str(exc)) from exc


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Raise :class:`MergeError` when ``out_dir`` is a non-empty folder and ``force`` is off."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise MergeError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise MergeError(f"{out_dir} is not empty; choose another folder or pass --force to "
                             "replace it")


def publish_dir(staging: Path, out_dir: Path) -> None:
    """Move a fully written ``staging`` folder to ``out_dir`` by rename (same filesystem).

    An existing ``out_dir`` is first renamed aside and deleted only after the new one is in
    place, so an interrupted replace never leaves a half-written ``out_dir``.
    """
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_for_merge(run_dir: str | Path, base: str = "dequantized", dtype: str | None = None, pm=None):
    """Load a run as a full-precision model with its adapter merged (in memory).

    Args:
        run_dir: a ``plugtune train`` run directory (adapter or full weights).
        base: ``"dequantized"`` or ``"original"`` (see the module docstring; only matters for
            adapters trained on a quantized base).
        dtype: ``"auto" | "fp32" | "bf16" | "fp16"``; default: the recipe's dtype policy.

    Returns:
        ``(model, tokenizer, spec, info)``: the merged ``PreTrainedModel`` (no peft wrapper), the
        run's tokenizer, the :class:`plugtune.spec.ModelSpec` it was loaded with and a
        provenance dict.

    Raises:
        MergeError: not a run directory, unknown ``base``, no plugin loads the base.
    """
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    if base not in BASES:
        raise MergeError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    run = Path(run_dir)
    recipe = _read_recipe(run)
    adapter = (run / "adapter_config.json").is_file()
    if not adapter and not (run / "config.json").is_file():
        raise MergeError(f"{run} holds neither an adapter nor full weights")
    target = resolve_dtype(dtype or recipe.dtype)
    updates: dict = {"tokenizer": str(run)}
    if not adapter:
        updates["base_model"] = str(run)
    else:
        from plugtune.export.portable import BaseModelMissing, resolve_base

        try:
            updates["base_model"] = resolve_base(run, recipe.base_model)
        except BaseModelMissing as exc:
            raise MergeError(str(exc)) from exc
    quantized = recipe.quantization
    if not adapter or base == "original" or quantized is None:
        # load in full precision: never quantize what is merged into
        updates.update(adapter="lora" if adapter else "none", load_in_4bit=False,
                       load_in_8bit=False, dtype=_DTYPE_NAMES[target])
    recipe = recipe.model_copy(update=updates)
    pm = pm or get_plugin_manager()
    spec = build_spec(recipe, pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    if loaded is None:
        raise MergeError(f"no plugin loaded {spec.path!r} (family {spec.family.name})")
    model, tok = loaded.model, loaded.tokenizer
    spec.extra["processor"] = loaded.processor  # vision: written beside the merged weights
    info = {"run_dir": str(run.resolve()), "base_model": recipe.base_model,
            "adapter": adapter, "trained_on": quantized or "full precision",
            "dtype": str(target).replace("torch.", "")}
    if adapter and quantized is not None and base == "dequantized":
        model = model.dequantize(dtype=target)
        info["merged_into"] = f"dequantized {quantized} base"
    elif adapter:
        info["merged_into"] = "original full-precision base"
    model = model.to(target)
    if adapter:
        from peft import PeftModel

        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        from plugtune.moe import prepare_adapter_load

        prepare_adapter_load(model, run)  # MoE expert weights' layout, as in training
        model = PeftModel.from_pretrained(model, str(run)).merge_and_unload()
    model.eval()
    return model, tok, spec, info


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def auto_class_name(model, spec) -> str:
    """The ``transformers`` Auto class that loads ``model``'s merged folder."""
    if spec.task == "seq2seq":
        return "AutoModelForSeq2SeqLM"
    if spec.task == "vision":
        from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        try:
            if type(model) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.values():
                return "AutoModelForImageTextToText"
        except Exception:  # noqa: BLE001 - a lazy mapping entry that cannot import
            pass
    return "AutoModelForCausalLM"


def write_merged(folder: Path, model, tok, spec, info: dict, run_dir: str | Path) -> None:
    """Write a merged model into ``folder``: safetensors weights, tokenizer (chat template),
    processor (vision), ``generation_config.json`` stopping on the end-of-turn token, a model
    card and ``plugtune_merge.json`` (provenance, the Auto class that loads it)."""
    from plugtune.export.portable import write_generation_config

    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    processor = spec.extra.get("processor") if spec.extra else None
    if processor is not None:
        processor.save_pretrained(folder)
    write_generation_config(folder, tok, model)
    info["family"] = spec.family.name
    info["auto_class"] = auto_class_name(model, spec)
    (folder / "plugtune_merge.json").write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(merged_card(folder, spec, info, run_dir))


def merged_card(folder: Path, spec, info: dict, run_dir: str | Path) -> str:
    """The model card of a merged folder: the run's Hub metadata (``library_name:
    transformers``), where it came from, and a snippet that loads it with plain transformers."""
    import yaml

    from plugtune.report import card_metadata

    recipe = spec.recipe
    user = _read_recipe(Path(run_dir))  # base_model as the user wrote it (hub id or path)
    meta = card_metadata(user, spec)
    meta["library_name"] = "transformers"
    meta["tags"] = [*meta.get("tags", []), "merged"]
    auto = info["auto_class"]
    run_card = Path(run_dir) / "README.md"
    fmt = ""
    if run_card.is_file() and "## Prompt format" in run_card.read_text():
        fmt = "## Prompt format" + run_card.read_text().split("## Prompt format", 1)[1].split("\n## ", 1)[0]
    load = f"{auto}.from_pretrained({str(folder)!r})" if auto != "AutoModelForImageTextToText" else \
        f"{auto}.from_pretrained({str(folder)!r})  # with AutoProcessor.from_pretrained(same folder)"
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---
# {Path(str(folder)).name}

The plugtune run `{info["run_dir"]}` with its adapter merged into `{recipe.base_model if user is None else user.base_model}`
({info.get("merged_into", "full weights")}, {info["dtype"]}): a standalone model that transformers,
vLLM and TGI load without peft or plugtune.

{fmt}
## Use

```python
from transformers import {auto}, AutoTokenizer

model = {load}
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
```
"""


def merge_run(run_dir: str | Path, out_dir: str | Path, force: bool = False,
              base: str = "dequantized", dtype: str | None = None, pm=None) -> Path:
    """Write the merged, standalone model of ``run_dir`` to ``out_dir`` (atomically).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        MergeError: see :func:`load_for_merge`; ``out_dir`` not empty without ``force``.
    """
    out = Path(out_dir)
    check_out_dir(out, force)
    model, tok, spec, info = load_for_merge(run_dir, base=base, dtype=dtype, pm=pm)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_merged(staging, model, tok, spec, info, run_dir)
        (staging / "README.md").write_text(  # the card names the final folder, not the staging one
            (staging / "README.md").read_text().replace(str(staging), str(out.resolve())))
        publish_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
