"""plugtune plugin for the vision model family. Hook implementations live in :mod:`plugtune_vision.plugin`."""

__version__ = "0.1.0"
