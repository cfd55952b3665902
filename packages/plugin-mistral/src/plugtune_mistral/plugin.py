"""plugtune-mistral: Mistral and Zephyr (grouped-query, sliding-window attention)."""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family

FAMILIES = [Family("mistral", ("mistral",), "causal", "Mistral 7B / Zephyr")]


@hookimpl
def plugtune_families():
    return FAMILIES
