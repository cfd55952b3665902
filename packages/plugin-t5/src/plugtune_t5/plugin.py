"""plugtune-t5: FLAN-T5 / mT5 / UMT5 sequence-to-sequence fine-tuning."""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family

FAMILIES = [Family("t5", ("t5", "mt5", "umt5"), "seq2seq", "FLAN-T5 small..XXL, mT5, UMT5")]


@hookimpl
def plugtune_families():
    return FAMILIES
