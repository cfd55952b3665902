"""Bundled example recipes outside the repository: list them, show one, copy one into any folder
with its local model/data paths made absolute (or explained), and say what a bundled recipe
needs when its files are not on this machine.

The bundled recipes name their sample model and data relative to the repository root
(``../shared/data/...``: the sample-data folder beside a plugtune checkout, described in its
``README.md``) or as the run folder of another recipe (``./runs/zephyr-sft-merged``). A path
is looked up in the current directory first, then in the checkout that holds the bundled
recipes (:func:`repo_root`). Imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from plugtune.config import RecipeError, list_bundled_recipes

#: where the bundled recipes' sample files come from (path fragment -> source); the sample-data
#: folder's own README.md (``../shared/data/README.md``) has licences and record counts.
SOURCES: tuple[tuple[str, str], ...] = (
    ("shared/data/models/stories260K", "karpathy's llama2.c stories260K (MIT), converted to a "
     "Hugging Face folder (config.json, model.safetensors, tokenizer.json)"),
    ("shared/data/dolly/", "a 151-record sample of databricks-dolly-15k (CC BY-SA 3.0, "
     "huggingface.co/datasets/databricks/databricks-dolly-15k) as JSONL"),
    ("shared/data/llama_factory/", "LLaMA-Factory's data/ folder (github.com/hiyouga/"
     "LLaMA-Factory, data/)"),
    ("shared/data/samsum/", "the SAMSum dialogue-summary set (huggingface.co/datasets/samsum, "
     "CC BY-NC-ND 4.0) as JSON"),
    ("shared/data/vision/", "scikit-image sample photos with one caption each (captions.json)"),
)


def repo_root() -> Path | None:
    """The plugtune checkout holding the bundled recipes (``packages/core/src/plugtune/recipes``
    four levels down), or ``None`` for an installed wheel."""
    from plugtune.config import bundled_recipes_dir

    here = bundled_recipes_dir().resolve()
    root = here.parents[4] if len(here.parents) > 4 else None
    return root if root is not None and (root / "packages" / "core").is_dir() else None


def recipe_text(name: str) -> str:
    """The YAML text of bundled recipe ``name``.

    Raises:
        RecipeError: no bundled recipe of that name (lists them, suggests the closest).
    """
    import difflib

    bundled = list_bundled_recipes()
    if name not in bundled:
        close = difflib.get_close_matches(name, list(bundled), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"no bundled recipe {name!r} (plugtune recipes lists "
                          f"{len(bundled)}).{hint}")
    return bundled[name].read_text(encoding="utf-8")


def _is_local(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~"))


def local_paths(data: dict) -> list[tuple[str, str]]:
    """``(key path, value)`` of a recipe mapping's local model/data paths (``base_model``,
    ``datasets.N.path``, ``test_datasets.N.path``) that are relative (``./``, ``../``)."""
    out = []
    if isinstance(data.get("base_model"), str):
        out.append(("base_model", data["base_model"]))
    for key in ("datasets", "test_datasets"):
        for i, ds in enumerate(data.get(key) or []):
            if isinstance(ds, dict) and isinstance(ds.get("path"), str):
                out.append((f"{key}.{i}.path", ds["path"]))
    return [(k, v) for k, v in out if _is_local(v) and not Path(v).expanduser().is_absolute()]


def find_local(value: str, cwd: Path | None = None) -> Path | None:
    """Where a recipe's relative path is on this machine: under ``cwd`` (default: the current
    directory), else under :func:`repo_root`; ``None`` when in neither."""
    for base in (cwd or Path.cwd(), repo_root()):
        if base is not None and (base / value).exists():
            return (base / value).resolve()
    return None


def what_it_is(value: str) -> str:
    """Where a missing sample file comes from (:data:`SOURCES`), or what makes a ``./runs/``
    folder (the bundled recipe whose ``output_dir`` it is)."""
    for fragment, source in SOURCES:
        if fragment in value:
            return source + "; the sample-data folder ../shared/data beside a plugtune checkout"
    norm = value.rstrip("/")
    for name, path in list_bundled_recipes().items():
        out = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("output_dir", "")
        if isinstance(out, str) and out.rstrip("/") and norm.startswith(out.rstrip("/")):
            return f"the run folder `plugtune train {name}` writes (run it first)"
        if isinstance(out, str) and norm.endswith("-merged") and norm[:-7] == out.rstrip("/"):
            return (f"the merged model of `plugtune train {name}` "
                    f"(then `plugtune merge {out} {value}`)")
    return "a local file or folder"


def missing_files(data: dict, cwd: Path | None = None) -> list[str]:
    """One line per relative model/data path of a recipe mapping that is on this machine
    neither under ``cwd`` nor under the checkout: which key, which file, where to get it."""
    return [f"{key}: {value} ({what_it_is(value)})"
            for key, value in local_paths(data) if find_local(value, cwd) is None]


def check_bundled(name: str, data: dict) -> None:
    """Fail fast, before any model loads, when bundled recipe ``name`` (its mapping after
    ``--set`` overrides: ``data``) names local files that are not here.

    Raises:
        RecipeError: names each missing file, what it is and where to get it, and the fixes
            (``--set KEY=PATH``, ``plugtune recipes copy``).
    """
    missing = missing_files(data, Path.cwd())
    if missing:
        raise RecipeError(
            f"bundled recipe {name!r} needs files that are not here (its relative paths are "
            f"read from the current folder, {Path.cwd()}; they are written for a plugtune "
            f"checkout's root, with the sample data in ../shared beside it):\n  "
            + "\n  ".join(missing)
            + "\nPoint them elsewhere with --set KEY=PATH (e.g. --set base_model=... "
            "--set datasets.0.path=...), or `plugtune recipes copy "
            f"{name}` and edit the copy.")


def copy_recipe(name: str, dest: Path | str = ".") -> Path:
    """Write bundled recipe ``name`` into folder ``dest`` as ``NAME.yaml``: each relative
    model/data path found on this machine (:func:`find_local`) becomes absolute; one that is
    not keeps its value with a comment saying what it is and where to get it. Comments and
    key order of the bundled file are kept. Returns the written file.

    Raises:
        RecipeError: unknown recipe name; ``dest`` holds a file of that name already.
    """
    text = recipe_text(name)
    data = yaml.safe_load(text) or {}
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}.yaml"
    if target.exists():
        raise RecipeError(f"{target} exists; remove it or copy into another folder")
    lines = text.splitlines()
    for key, value in local_paths(data):
        found = find_local(value)
        leaf = key.rsplit(".", 1)[-1]
        pat = re.compile(rf"^(\s*(?:-\s+)?{re.escape(leaf)}:\s*)({re.escape(value)})(\s*(#.*)?)$")
        for i, line in enumerate(lines):
            m = pat.match(line)
            if not m:
                continue
            if found is not None:
                lines[i] = f"{m.group(1)}{found}{m.group(3)}"
            else:
                lines[i] = (f"{m.group(1)}{value}  # not on this machine: {what_it_is(value)}; "
                            "set the path to your copy")
            break
    head = (f"# copied from plugtune's bundled recipe {name} (plugtune recipes copy): its "
            "relative model/data paths\n# are absolute here, or commented when not on this "
            "machine; the comments below are the original's.")
    target.write_text(head + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return target


def describe(name: str, path: Path) -> dict:
    """One row of ``plugtune recipes``: name, base_model, adapter, method, datasets, file."""
    d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {"name": name, "base_model": str(d.get("base_model")),
            "adapter": str(d.get("adapter", "lora")), "method": str(d.get("rl") or "sft"),
            "datasets": [f"{x.get('type')}:{x.get('path')}" for x in d.get("datasets") or []
                         if isinstance(x, dict)],
            "file": str(path)}
