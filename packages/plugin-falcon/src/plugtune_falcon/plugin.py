"""plugtune-falcon: Falcon (multi-query, new decoder architecture) and legacy RefinedWeb."""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family

FAMILIES = [Family("falcon", ("falcon", "RefinedWeb", "RefinedWebModel"), "causal",
                   "Falcon 7B/40B/180B incl. legacy RefinedWeb checkpoints")]


@hookimpl
def plugtune_families():
    return FAMILIES
