"""plugtune plugin for the Gemma model families. Hook implementations live in :mod:`plugtune_gemma.plugin`."""

__version__ = "0.1.0"
