"""plugtune: plugin-based instruction tuning for LLMs.

The core owns the pipeline (recipe -> data -> Trainer -> run directory) and the pluggy hooks
(:mod:`plugtune.hookspecs`); each model family's quirks live in an installable plugin.
"""

from plugtune.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
