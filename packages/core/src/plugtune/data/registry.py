"""Dataset registries: LLaMA-Factory's ``dataset_info.json``.

A LLaMA-Factory user names datasets (``dataset: identity,alpaca_en_demo``) that a
``dataset_info.json`` in ``dataset_dir`` describes; :func:`resolve_llamafactory` turns those
entries into plugtune dataset entries (plain dicts that validate as
:class:`~plugtune.config.DatasetConfig`; this module does not import the config, which imports
it for the recipe's ``dataset:`` key), following the format as
LLaMA-Factory's ``data/README.md`` documents it (hiyouga/LLaMA-Factory, ``data/README.md``):

==========================  ==============================================================
entry                       plugtune dataset
==========================  ==============================================================
alpaca (default)            ``type: alpaca``; columns prompt/query/response/system/history
alpaca, stage ``pt``        ``type: text`` on the ``prompt`` column (pre-training)
alpaca + ``ranking``        ``type: preference``: prompt/query + chosen/rejected
sharegpt                    ``type: sharegpt``: messages + system + tools; ``tags`` give the
                            role/content keys and role names (function_call, observation)
sharegpt + ``images``       ``type: vision`` (``<image>`` placeholders, paths in ``images``)
sharegpt + ``ranking``      ``type: preference`` (messages + chosen/rejected messages)
``kto_tag`` column          ``type: kto`` (messages + boolean tag)
==========================  ==============================================================

``num_samples`` becomes ``max_samples``; ``split`` is kept. Hub entries (``hf_hub_url``,
``ms_hub_url``, ``om_hub_url``) become hub ids with ``subset`` as the config name;
``script_url`` and ``cloud_file_name`` are refused with the reason. Only the standard library is
imported here, so a recipe validates before ``datasets`` or torch load.
"""

from __future__ import annotations

import json
from pathlib import Path

from plugtune.data.errors import DataError

#: LLaMA-Factory ``columns`` key -> plugtune canonical column name
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output",
                   "system": "system", "history": "history", "chosen": "chosen",
                   "rejected": "rejected", "tools": "tools", "images": "images"}
_SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools",
                     "images": "images", "chosen": "chosen", "rejected": "rejected",
                     "kto_tag": "label"}
#: LLaMA-Factory ShareGPT tag defaults (data/README.md)
_TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "observation_tag": "observation",
                 "function_tag": "function_call", "system_tag": "system"}
_TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
              "function_tag": "function_call", "system_tag": "system"}
#: LLaMA-Factory stages whose data is preference pairs / unpaired / raw text
_STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")


def read_dataset_info(dataset_dir: str | Path) -> tuple[Path, dict]:
    """Read ``dataset_dir/dataset_info.json``.

    Raises:
        DataError: the folder or file is missing, or the file is not a JSON object.
    """
    info = Path(dataset_dir).expanduser() / "dataset_info.json"
    if not info.is_file():
        raise DataError(f"{info}: not found; dataset: names entries of dataset_info.json in "
                        "dataset_dir (LLaMA-Factory's default dataset_dir is ./data)")
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{info}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{info}: expected a JSON object of dataset entries")
    return info, data


def _names(names: str | list[str]) -> list[str]:
    items = names.split(",") if isinstance(names, str) else list(names)
    out = [str(n).strip() for n in items if str(n).strip()]
    if not out:
        raise DataError("dataset: no dataset names given")
    return out


def entry_to_config(name: str, entry: dict, dataset_dir: Path, stage: str | None = None,
                    source: str = "dataset_info.json", **overrides) -> dict:
    """One ``dataset_info.json`` entry -> a dataset entry dict (see the module table).

    Raises:
        DataError: an entry plugtune cannot read (script / cloud datasets, unknown
            ``formatting``, a missing file), naming ``source`` and the entry.
    """
    where = f"{source}: {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if entry.get("script_url") or entry.get("cloud_file_name"):
        what = "script_url" if entry.get("script_url") else "cloud_file_name"
        raise DataError(f"{where}: {what} datasets are not supported (plugtune reads local "
                        "files and hub datasets); download it and point file_name at it")
    hub = entry.get("hf_hub_url") or entry.get("ms_hub_url") or entry.get("om_hub_url")
    cfg: dict = {}
    if hub:
        cfg["path"] = hub
        if entry.get("subset"):
            cfg["name"] = entry["subset"]
        if entry.get("folder"):
            cfg["data_files"] = f"{entry['folder'].rstrip('/')}/*"
    elif entry.get("file_name"):
        path = dataset_dir / entry["file_name"]
        if not path.exists():
            raise DataError(f"{where}: file_name {str(path)!r} does not exist")
        cfg["path"] = str(path)
    else:
        raise DataError(f"{where}: needs file_name (or hf_hub_url / ms_hub_url)")
    if entry.get("split"):
        cfg["split"] = entry["split"]
    if entry.get("num_samples"):
        cfg["max_samples"] = int(entry["num_samples"])
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting {formatting!r}; expected alpaca or sharegpt")
    columns = dict(entry.get("columns") or {})
    for bad in ("videos", "audios"):
        if bad in columns:
            raise DataError(f"{where}: a {bad} column is not supported (plugtune trains on text "
                            "and images)")
    ranking = bool(entry.get("ranking"))
    table = _ALPACA_COLUMNS if formatting == "alpaca" else _SHAREGPT_COLUMNS
    mapped = {table[k]: v for k, v in columns.items() if k in table and v}
    unknown = sorted(set(columns) - set(table) - {"kto_tag"})
    if unknown:
        raise DataError(f"{where}: unknown columns {unknown} for formatting {formatting!r}")
    if "kto_tag" in columns:
        mapped["label"] = columns["kto_tag"]
    if formatting == "alpaca":
        if stage == "pt" or (set(columns) == {"prompt"} and stage is None
                             and columns["prompt"] == "text"):
            cfg.update(type="text", columns={"text": columns.get("prompt", "instruction")})
        elif "kto_tag" in columns:
            cfg.update(type="kto", columns=mapped)
        elif ranking:
            cfg.update(type="preference", columns=mapped)
        else:
            cfg.update(type="alpaca", columns=mapped)
    else:
        tags = {**_TAG_DEFAULTS, **(entry.get("tags") or {})}
        unknown_tags = sorted(set(tags) - set(_TAG_DEFAULTS))
        if unknown_tags:
            raise DataError(f"{where}: unknown tags {unknown_tags}; expected {sorted(_TAG_DEFAULTS)}")
        mapped.setdefault("conversations", "conversations")
        mapped["messages"] = mapped["conversations"]
        cfg["tags"] = tags
        if "kto_tag" in columns:
            cfg["type"] = "kto"
        elif ranking:
            cfg["type"] = "preference"
        elif "images" in columns:
            cfg["type"] = "vision"
        else:
            cfg["type"] = "sharegpt"
        cfg["columns"] = mapped
    if stage in ("rm", "dpo") and cfg["type"] != "preference":
        raise DataError(f"{where}: stage {stage} needs a preference dataset (ranking: true)")
    if stage == "kto" and cfg["type"] != "kto":
        raise DataError(f"{where}: stage kto needs a kto_tag column")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def resolve_llamafactory(names: str | list[str], dataset_dir: str | Path = "data",
                         stage: str | None = None, **overrides) -> list[dict]:
    """LLaMA-Factory's ``dataset:`` names + ``dataset_dir`` -> plugtune dataset entries (dicts
    for ``datasets:``; ``DatasetConfig(**entry)`` validates one).

    Args:
        names: ``"a,b"`` or ``["a", "b"]``: entries of ``dataset_dir/dataset_info.json``.
        dataset_dir: the folder of ``dataset_info.json``; ``file_name`` is relative to it.
        stage: LLaMA-Factory's ``stage`` (pt, sft, rm, ppo, dpo, kto) when known: ``pt`` reads
            alpaca entries as raw text; rm/dpo/kto check the entries fit.
        overrides: :class:`DatasetConfig` keys set on every entry (e.g. ``max_samples``,
            ``on_bad_row``); ``None`` values are ignored.

    Raises:
        DataError: a missing registry, an unknown name (with the closest names), or an entry
            plugtune cannot read.
    """
    if stage is not None and stage not in _STAGES:
        raise DataError(f"stage {stage!r}: expected one of {', '.join(_STAGES)}")
    info_path, info = read_dataset_info(dataset_dir)
    out = []
    for name in _names(names):
        if name not in info:
            import difflib

            close = difflib.get_close_matches(name, list(info), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DataError(f"{info_path}: no dataset named {name!r}{hint}")
        out.append(entry_to_config(name, info[name], info_path.parent, stage,
                                   source=str(info_path), **overrides))
    return out
