"""Load the recipe's datasets with ``datasets`` and turn them into canonical examples.

Files (jsonl, json, csv, parquet, txt), local folders and hub ids all go through
``datasets.load_dataset``. When a file cannot be parsed, :func:`diagnose_file` re-reads it only
to name the first bad line (non-UTF-8 bytes, malformed JSON) so the user gets
``file:line: why`` instead of an Arrow traceback.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
from pathlib import Path

import datasets

from plugtune.config import DatasetConfig
from plugtune.data.errors import DataError
from plugtune.data.formats import ADAPTERS, BadRecord, Shape, kind_of, vision_features

log = logging.getLogger(__name__)

_TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
              "function_tag": "function_call", "system_tag": "system"}

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text", ".arrow": "arrow"}
#: compressed text files ``datasets`` reads through fsspec (``.zst`` needs ``zstandard``)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


def file_suffix(path: Path) -> tuple[str, str | None]:
    """``(format suffix, compression)``: ``a.jsonl.gz`` -> ``(".jsonl", "gzip")``."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSIONS[suffixes[-1]]
    return path.suffix.lower(), None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its suffix names a compression."""
    _, compression = file_suffix(path)
    if compression is None:
        return path.read_bytes()
    import fsspec

    try:
        with fsspec.open(str(path), "rb", compression=compression) as fh:
            return fh.read()
    except ImportError as exc:  # zstd without zstandard
        raise DataError(f"{path}: reading {compression} files needs {exc.name or 'zstandard'}: "
                        f"pip install zstandard") from None
    except Exception as exc:
        raise DataError(f"{path}: not a valid {compression} file ({exc})") from None


def check_utf8(path: Path) -> None:
    """Raise :class:`DataError` naming the first line of a text file that is not UTF-8.

    Arrow reads such bytes without complaint and fails later, far from the file, so text
    files are checked before loading (one decode pass; no parsing). An uncompressed file is
    decoded in 1 MiB blocks (memory stays flat in the file's size); the whole file is read only
    to name the bad line.
    """
    suffix, compression = file_suffix(path)
    if suffix not in (".json", ".jsonl", ".csv", ".txt"):
        return
    if compression is None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            pass
    raw = read_bytes(path)
    try:
        raw.decode("utf-8")
        return
    except UnicodeDecodeError:
        pass
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{i}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at "
                            f"column {exc.start + 1}); re-encode the file as UTF-8") from None


#: record formats whose records are lines (a ``.json`` file is checked when it is not a JSON array)
_LINE_RECORDS = (".jsonl", ".json", ".csv", ".txt")


def check_record_sizes(path: Path, max_bytes: int | None, chunk: int = 1 << 20) -> None:
    """Raise :class:`DataError` naming the first line of ``path`` longer than ``max_bytes``.

    Runs before ``datasets`` parses the file, streaming it in ``chunk``-byte blocks, so memory
    stays bounded by ``chunk`` whatever the file holds (one 200 MB JSON line took 21 GB in
    tokenization before this guard). Lines are records in jsonl, csv and txt files and in
    ``.json`` files in JSON-lines layout; a ``.json`` array (``[`` first) is not checked, since
    a minified array is one long line.

    Args:
        path: a local data file.
        max_bytes: the recipe's ``max_record_bytes``; ``None`` disables the check.
    """
    if not max_bytes or path.suffix.lower() not in _LINE_RECORDS:
        return
    with path.open("rb") as f:
        if path.suffix.lower() == ".json":
            head = f.read(4096).lstrip()
            if head.startswith(b"["):
                return
            f.seek(0)
        line, run = 1, 0  # run: bytes of the current line read so far
        while block := f.read(chunk):
            start = 0
            while (nl := block.find(b"\n", start)) >= 0:
                if run + nl - start > max_bytes:
                    break
                line, run, start = line + 1, 0, nl + 1
            else:
                run += len(block) - start
                if run <= max_bytes:
                    continue
            raise DataError(
                f"{path}:{line}: record longer than max_record_bytes={max_bytes:,} bytes; "
                "split or drop it, or raise datasets[].max_record_bytes (null: no limit)")


def check_not_empty(path: Path) -> None:
    """Raise :class:`DataError` when ``path`` holds no record (empty or whitespace only)."""
    with path.open("rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return
    raise DataError(f"{path}: the file is empty (no records); point datasets[].path at a file "
                    "with at least one record")


def diagnose_file(path: Path) -> str | None:
    """Find the first line of ``path`` that is not valid JSON; ``None`` if fine.

    Only called after ``datasets`` failed, to turn its error into ``file:line: why``.
    """
    raw = read_bytes(path)
    suffix = file_suffix(path)[0]
    if suffix == ".jsonl" or (suffix == ".json" and not raw.lstrip().startswith(b"[")
                              and not raw.lstrip().startswith(b"{\n") and b"\n{" in raw):
        for i, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{i}: malformed JSON line ({exc.msg} at column {exc.colno})"
            if not isinstance(value, dict):
                return f"{path}:{i}: expected a JSON object per line, got {type(value).__name__}"
    elif suffix == ".json":
        try:
            json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
    return None


def _line_hint(path: Path | None, row: int) -> str:
    if path is None:
        return f"row {row}"
    if file_suffix(path)[0] == ".jsonl":
        return f"{path}:{row + 1} (record {row})"
    if file_suffix(path)[0] == ".csv":
        return f"{path}:{row + 2} (row {row})"
    return f"{path} record {row}"


def load_raw(cfg: DatasetConfig) -> tuple[datasets.Dataset, Path | None]:
    """Load one recipe dataset as a ``datasets.Dataset`` (no format applied yet).

    Returns:
        ``(dataset, local_file)`` where ``local_file`` is the file path when the dataset is a
        single local file (used for line numbers in errors), else ``None``.

    Raises:
        DataError: missing path, unreadable file (with the first bad line), unknown split.
    """
    from plugtune.demo import materialize

    p = Path(os.path.expanduser(materialize(cfg.path)))
    local_file: Path | None = None
    try:
        if p.is_file():
            suffix, compression = file_suffix(p)
            builder = cfg.ds_type or _BUILDERS.get(suffix)
            if builder is None:
                raise DataError(f"{p}: unsupported file type {''.join(p.suffixes)!r}; expected "
                                f"one of {', '.join(_BUILDERS)}, optionally compressed "
                                f"({', '.join(COMPRESSIONS)})")
            if compression and builder in ("parquet", "arrow"):
                raise DataError(f"{p}: {builder} files are compressed inside; a {compression} "
                                f"{builder} file is not readable: decompress it")
            local_file = p
            check_not_empty(p)
            check_record_sizes(p, cfg.max_record_bytes)
            check_utf8(p)
            # axolotl's field is completion's text column; otherwise the JSON key of the records
            kwargs = {"field": cfg.field} if (cfg.field and builder == "json"
                                              and cfg.type != "completion") else {}
            split = cfg.split if cfg.split.startswith("train") else "train"
            ds = datasets.load_dataset(builder, data_files=str(p), split=split, **kwargs)
        elif p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(p))
                ds = loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                ds = datasets.load_dataset(str(p), data_files=cfg.data_files, split=cfg.split)
        elif cfg.path.startswith((".", "/", "~")) or file_suffix(p)[0] in _BUILDERS:
            raise DataError(f"dataset path {cfg.path!r} does not exist")
        else:
            ds = datasets.load_dataset(cfg.path, cfg.name, data_files=cfg.data_files,
                                       split=cfg.split)
    except DataError:
        raise
    except Exception as exc:  # turn library errors into file:line messages
        why = diagnose_file(p) if p.is_file() else None
        if why:
            raise DataError(why) from None
        raise DataError(f"could not load dataset {cfg.path!r}: {type(exc).__name__}: {exc}") from exc
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    return ds, local_file


def to_canonical(cfg: DatasetConfig, num_proc: int | None = None,
                 key: str = "datasets[]") -> tuple[datasets.Dataset, int]:
    """Load one dataset and apply its format adapter.

    ``key``: where the dataset sits in the recipe (``datasets[0]``), named in the hint of a
    bad-row error.

    Returns:
        ``(dataset_of_canonical_examples, skipped_rows)``.

    Raises:
        DataError: a bad record, naming file, line and field (unless ``on_bad_row: skip``).
    """
    ds, local_file = load_raw(cfg)
    ds = _undecoded_images(ds)
    cols, shape = dataset_shape(cfg, local_file)
    adapter = functools.partial(ADAPTERS[cfg.type], shape=shape)
    system = cfg.system_prompt
    features = vision_features() if cfg.type == "vision" else None

    def convert(batch: dict, idx: list[int]) -> dict:
        keys = list(batch)
        out: dict[str, list] = {"example": [], "_error": [], "_missing": []}
        for j, row in enumerate(idx):
            rec = {k: batch[k][j] for k in keys}
            try:
                out["example"].append(json.dumps(adapter(rec, cols, system)))
                out["_error"].append("")
                out["_missing"].append("")
            except BadRecord as exc:
                out["example"].append("")
                out["_error"].append(f"{_line_hint(local_file, row)}: {exc}")
                out["_missing"].append(exc.field if exc.why.startswith("missing") else "")
        return out

    conv = ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names,
                  num_proc=num_proc if num_proc and len(ds) > 1000 else None,
                  desc=f"format {cfg.type}")
    errors = [e for e in conv["_error"] if e]
    missing = {m for m in conv["_missing"]}
    if errors and len(errors) == len(conv) and "" not in missing:
        # every row lacks a field: the file's columns have other names, not bad rows
        names = ", ".join(map(str, ds.column_names))
        raise DataError(
            f"{errors[0]}: no row of {cfg.path} has the field(s) {', '.join(sorted(missing))} "
            f"that type {cfg.type!r} reads; map them to the file's columns ({names}) with "
            f"datasets[].columns, e.g. columns: {{{sorted(missing)[0]}: {ds.column_names[0]}}}")
    if errors and cfg.on_bad_row == "error":
        more = f" (and {len(errors) - 1} more bad rows; set {key}.on_bad_row: skip to skip " \
            "them)" if len(errors) > 1 else f" (set {key}.on_bad_row: skip to skip bad rows)"
        raise DataError(f"{errors[0]}{more}")
    if errors:
        log.warning("%s: skipped %d bad rows, first: %s", cfg.path, len(errors), errors[0])
        conv = conv.filter(lambda e: not e, input_columns="_error")
    conv = conv.map(_decoder(conv["example"]) if features is None else
                    (lambda b: json.loads(b["example"])),
                    remove_columns=["example", "_error", "_missing"], features=features)
    return conv, len(errors)


def _decoder(examples: list[str]):
    """A ``map`` function that decodes the JSON examples with every key any of them has (``None``
    where a row lacks it), so Arrow sees one schema: rows with and without ``tools``, messages
    with and without ``tool_calls``."""
    top: dict[str, None] = {}
    msg: dict[str, None] = {}
    for ex in examples:
        d = json.loads(ex)
        top.update(dict.fromkeys(d))
        for m in d.get("messages") or d.get("prompt") or []:
            if isinstance(m, dict):
                msg.update(dict.fromkeys(m))

    def decode(b: dict) -> dict:
        d = json.loads(b["example"])
        for key in ("messages", "prompt"):
            if isinstance(d.get(key), list):
                d[key] = [{**msg, **m} for m in d[key]]
        return {**top, **d}
    return decode


def _undecoded_images(ds: datasets.Dataset) -> datasets.Dataset:
    """Image columns as ``{"bytes", "path"}`` (adapters write them to files; no PIL decode)."""
    def undecoded(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, datasets.List | datasets.Sequence):
            inner = undecoded(feature.feature)
            return datasets.List(inner) if inner is not None else None
        return None

    for name, feature in ds.features.items():
        new = undecoded(feature)
        if new is not None:
            ds = ds.cast_column(name, new)
    return ds


def dataset_shape(cfg: DatasetConfig, local_file: Path | None = None) -> tuple[dict, Shape]:
    """The adapter's column map and :class:`~plugtune.data.formats.Shape` for one dataset entry.

    axolotl keys map onto canonical columns (``field_messages`` -> messages, ``field_chosen``,
    ``field_rejected``, ``field_tools``, and ``field`` -> the text column of ``completion``),
    ``message_property_mappings`` / ``tags`` onto the message keys, ``roles`` / ``tags`` onto
    the role names. Explicit ``columns`` win.
    """
    cols: dict[str, str] = {}
    if cfg.field_messages:
        cols["messages"] = cols["conversations"] = cfg.field_messages
    for name, value in (("chosen", cfg.field_chosen), ("rejected", cfg.field_rejected),
                        ("tools", cfg.field_tools)):
        if value:
            cols[name] = value
    if cfg.type == "completion" and cfg.field:
        cols["text"] = cfg.field
    cols.update(cfg.columns)
    mapping = dict(cfg.message_property_mappings or {})
    if cfg.message_field_role:
        mapping.setdefault("role", cfg.message_field_role)
    if cfg.message_field_content:
        mapping.setdefault("content", cfg.message_field_content)
    roles: dict[str, str] = {}
    for target, sources in (cfg.roles or {}).items():
        for src in sources:
            roles[src] = target
    role_key, content_key = mapping.get("role"), mapping.get("content")
    if cfg.tags:
        role_key = role_key or cfg.tags.get("role_tag")
        content_key = content_key or cfg.tags.get("content_tag")
        for tag, target in _TAG_ROLES.items():
            if cfg.tags.get(tag):
                roles.setdefault(cfg.tags[tag], target)
    from plugtune.demo import materialize

    where = Path(os.path.expanduser(materialize(cfg.path)))
    base = cfg.image_dir or (local_file.parent if local_file else where if where.is_dir() else None)
    shape = Shape(role_key=role_key, content_key=content_key, roles=roles, base_dir=base,
                  allow_images=cfg.type in ("vision", "chat_template"),
                  training_key=cfg.message_field_training,
                  image_cache=Path(datasets.config.HF_DATASETS_CACHE) / "plugtune_images")
    return cols, shape


def load_datasets(cfgs: list[DatasetConfig], num_proc: int | None = None,
                  seed: int = 42, key: str = "datasets") -> tuple[datasets.Dataset, dict]:
    """Load, convert and mix several datasets (multi-task); returns ``(dataset, stats)``.

    ``key``: the recipe key the list came from (``datasets``, ``test_datasets``), for errors.

    Mixed datasets must share one kind (all chat, or all text ...). The mix is shuffled with
    ``seed`` so one task does not fill whole optimizer steps.
    """
    parts, stats = [], {"skipped_bad_rows": 0, "per_dataset": {}}
    for i, cfg in enumerate(cfgs):
        ds, skipped = to_canonical(cfg, num_proc=num_proc, key=f"{key}[{i}]")
        stats["skipped_bad_rows"] += skipped
        stats["per_dataset"][cfg.path] = len(ds)
        parts.append(ds)
    if len(parts) == 1:
        return parts[0], stats
    kinds = {cfg.path: kind_of(ds[0]) for cfg, ds in zip(cfgs, parts) if len(ds)}
    if len(set(kinds.values())) > 1:
        raise DataError(
            "datasets in one recipe must share a kind (chat formats mix with each other; text, "
            "seq2seq, preference and kto only with their own kind): "
            + ", ".join(f"{p}: {k}" for p, k in kinds.items()))
    try:
        mixed = datasets.concatenate_datasets(parts)
    except (ValueError, TypeError):
        # same kind, different optional keys (tools, tool_calls, images): one schema for all
        as_json = [ds.map(lambda b: {"example": json.dumps(dict(b))}, remove_columns=ds.column_names)
                   for ds in parts]
        mixed = datasets.concatenate_datasets(as_json)
        mixed = mixed.map(_decoder(mixed["example"]), remove_columns=["example"])
    return mixed.shuffle(seed=seed), stats
