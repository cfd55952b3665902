"""plugtune plugin for the llama model family. Hook implementations live in :mod:`plugtune_llama.plugin`."""

__version__ = "0.1.0"
