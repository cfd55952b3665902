"""plugtune-llama: Llama 2 / 3.x, Qwen2 / Qwen2.5 and BLOOM / BLOOMZ."""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family

FAMILIES = [
    Family("llama", ("llama",), "causal", "Llama 2 / Llama 3.x"),
    Family("qwen2", ("qwen2",), "causal", "Qwen2 / Qwen2.5"),
    Family("bloom", ("bloom",), "causal", "BLOOM / BLOOMZ (fused query_key_value)"),
]


@hookimpl
def plugtune_families():
    return FAMILIES
