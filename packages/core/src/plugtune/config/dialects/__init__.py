"""Config dialects: other tools' config files, detected and translated into a plugtune recipe.

A dialect module exposes ``NAME`` (shown to the user), ``detect(data) -> bool`` and
``translate(data, source) -> Translation``. :func:`translate` tries LLaMA-Factory and TRL first
(they are told apart by keys plugtune never uses), then axolotl: a mapping whose keys are all
plugtune's is a plugtune recipe; one with any key only axolotl has is an axolotl config.

Only ``yaml``/``pydantic`` are imported here (no torch): a bad config is reported in well under a
second (``tests/test_config_dialects.py`` checks that ``torch`` is never imported).
"""

from __future__ import annotations

from typing import Any

from plugtune.config.dialects import axolotl, llamafactory, trl
from plugtune.config.dialects.base import Translation, is_unset

__all__ = ["Translation", "is_unset", "translate"]


def translate(data: dict[str, Any], source: str = "<recipe>") -> Translation:
    """Detect the dialect of a raw config mapping and translate it.

    Raises:
        plugtune.config.RecipeError: a key the dialect recognises but plugtune cannot honour
            (the message names the key and what plugtune lacks).
    """
    for mod in (llamafactory, trl):
        if mod.detect(data):
            return mod.translate(data, source)
    return axolotl.translate(data, source)
