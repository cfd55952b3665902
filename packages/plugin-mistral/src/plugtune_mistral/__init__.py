"""plugtune plugin for the mistral model family. Hook implementations live in :mod:`plugtune_mistral.plugin`."""

__version__ = "0.1.0"
