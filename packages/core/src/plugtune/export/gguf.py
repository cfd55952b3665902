"""GGUF in: a ``.gguf`` base model, de-quantized once into a cached safetensors folder.

``base_model:`` may name a ``.gguf`` file, or a folder holding one (and no ``config.json``).
transformers reads it (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package:
``pip install 'plugtune[gguf]'``) and de-quantizes the weights to fp32; such a model refuses
``save_pretrained`` ("quantized with gguf and is not serializable", ../shared/FINDINGS.md), so
the weights are copied into a model built from the same config without its
``quantization_config`` and saved as safetensors with the tokenizer (chat template included).

The cache lives in ``$PLUGTUNE_HOME/gguf`` (default ``~/.cache/plugtune/gguf``), one folder per
GGUF file keyed by its name, size and modification time (``<stem>-<sha256[:16]>``), written to
a temporary sibling and renamed into place, so the first run pays the de-quantization (~15 s
for a 135M model on 2 CPU cores) and later runs load plain safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SOURCE_INFO = "plugtune_gguf.json"


class GGUFError(RuntimeError):
    """A GGUF file cannot be read or converted; the message says which and why."""


def gguf_home() -> Path:
    """The de-quantized GGUF cache: ``$PLUGTUNE_HOME/gguf`` (default ``~/.cache/plugtune/gguf``)."""
    base = os.environ.get("PLUGTUNE_HOME") or os.path.join(Path.home(), ".cache", "plugtune")
    return Path(base) / "gguf"


def find_gguf(path: str) -> Path | None:
    """The GGUF file ``path`` names (the file, or the single ``*.gguf`` in a folder that has no
    ``config.json``), else ``None``.

    Raises:
        GGUFError: a folder with several GGUF files (name one), or a missing ``.gguf`` file.
    """
    p = Path(path).expanduser()
    if path.endswith(".gguf"):
        if not p.is_file():
            raise GGUFError(f"base_model {path!r}: no such GGUF file")
        return p.resolve()
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise GGUFError(f"base_model {path!r} holds several GGUF files "
                            f"({', '.join(f.name for f in found)}); name one of them")
        if found:
            return found[0].resolve()
    return None


def cache_key(gguf_file: Path) -> str:
    """``<stem>-<16 hex>``: sha256 of the absolute path, size and mtime (ns) of ``gguf_file``."""
    st = gguf_file.stat()
    h = hashlib.sha256(f"{gguf_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{gguf_file.stem}-{h[:16]}"


def materialize(path: str) -> str:
    """``path`` unchanged, or the cached safetensors folder of the GGUF it names (built once)."""
    src = find_gguf(path)
    if src is None:
        return path
    dest = gguf_home() / cache_key(src)
    if not (dest / SOURCE_INFO).is_file():
        dequantize(src, dest)
    return str(dest)


def _require_gguf() -> None:
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'plugtune[gguf]'")


def gguf_metadata(gguf_file: Path) -> dict:
    """The ``general.*`` string fields of a GGUF file (name, license, base model urls ...)."""
    from gguf import GGUFReader

    out = {}
    for key, field in GGUFReader(str(gguf_file)).fields.items():
        if key.startswith("general."):
            try:
                out[key] = field.contents()
            except Exception:  # noqa: BLE001 - an unreadable field is not needed here
                continue
    return out


def dequantize(gguf_file: Path, dest: Path) -> Path:
    """Write ``gguf_file`` as a plain safetensors model folder ``dest`` (fp32, with tokenizer).

    Raises:
        GGUFError: transformers cannot read the file (architecture not supported by its GGUF
            loader, or the gguf package is missing).
    """
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        kw = dict(gguf_file=gguf_file.name)
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype="float32", **kw)
    except Exception as exc:
        raise GGUFError(f"cannot load {gguf_file} with transformers' GGUF reader: {exc}") from exc
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are de-quantized already
    import torch

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    meta = gguf_metadata(gguf_file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        card = ["---"]
        if meta.get("general.license"):
            card.append(f"license: {meta['general.license']}")
        repo = str(meta.get("general.base_model.0.repo_url") or "")
        if "huggingface.co/" in repo:
            card.append(f"base_model: {repo.split('huggingface.co/', 1)[1].strip('/')}")
        card += ["---", f"De-quantized from `{gguf_file}` by plugtune (fp32 safetensors).", ""]
        (tmp / "README.md").write_text("\n".join(card))
        st = gguf_file.stat()
        (tmp / SOURCE_INFO).write_text(json.dumps(
            {"gguf_file": str(gguf_file), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "metadata": {k: v for k, v in meta.items() if isinstance(v, str | int | float)}},
            indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
