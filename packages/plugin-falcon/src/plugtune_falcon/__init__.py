"""plugtune plugin for the falcon model family. Hook implementations live in :mod:`plugtune_falcon.plugin`."""

__version__ = "0.1.0"
