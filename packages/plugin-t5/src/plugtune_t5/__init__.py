"""plugtune plugin for the t5 model family. Hook implementations live in :mod:`plugtune_t5.plugin`."""

__version__ = "0.1.0"
