"""plugtune plugin for Microsoft's Phi-3 family. Hook implementations live in :mod:`plugtune_phi.plugin`."""

__version__ = "0.1.0"
