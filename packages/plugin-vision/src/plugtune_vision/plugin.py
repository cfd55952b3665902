"""plugtune-vision: Llama 3.2 Vision (mllama), Qwen2-VL / Qwen2.5-VL and Molmo."""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family

FAMILIES = [
    Family("mllama", ("mllama",), "vision", "Llama 3.2 Vision (cross-attention adapters)"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "vision", "Qwen2-VL / Qwen2.5-VL"),
    Family("molmo", ("molmo2",), "vision", "Molmo 2 (native); original Molmo via remote code"),
]


@hookimpl
def plugtune_families():
    return FAMILIES
