"""plugtune plugin for Qwen3, Qwen3-MoE, Qwen3.5 (text) and SmolLM3: hybrid-thinking chat
templates. Hook implementations live in :mod:`plugtune_qwen3.plugin`."""

__version__ = "0.1.0"
