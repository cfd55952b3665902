"""The instruction data pipeline: formats, registries, templates, tokenization + label masking,
packing.

Names are imported lazily so that ``plugtune.data.registry`` (recipe validation) does not load
``datasets`` or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Collator": "plugtune.data.collate",
    "DataError": "plugtune.data.errors",
    "IGNORE_INDEX": "plugtune.data.tokenize",
    "PreparedData": "plugtune.data.pipeline",
    "TemplateInfo": "plugtune.data.tokenize",
    "best_fit_decreasing": "plugtune.data.packing",
    "pack_rows": "plugtune.data.packing",
    "prepare": "plugtune.data.pipeline",
    "probe_template": "plugtune.data.tokenize",
    "resolve_llamafactory": "plugtune.data.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plugtune.data' has no attribute {name!r}")
