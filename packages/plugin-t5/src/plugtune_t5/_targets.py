"""LoRA target modules of T5-family models (peft's table row for t5/mt5, owned here)."""

from __future__ import annotations

import re

from torch import nn

from plugtune.config import RecipeError
from plugtune.modeling import linear_module_names

#: The FLAN-T5 LoRA recipe (Schmid, "Efficient Large Language Model training with LoRA and
#: Hugging Face", 2023) and peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["t5"]``.
AUTO = ["q", "v"]
#: Canonical order of T5's Linear leaves: attention q,k,v,o; gated FFN wi_0,wi_1,wo (T5 v1.1,
#: FLAN-T5, mT5, UMT5) or plain FFN wi,wo (original T5).
ORDER = ["q", "k", "v", "o", "wi_0", "wi_1", "wi", "wo"]


def all_linear(model: nn.Module) -> list[str]:
    """Every Linear leaf name of the encoder and decoder, in :data:`ORDER`, without ``lm_head``."""
    found = linear_module_names(model, exclude=("lm_head",))
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def explicit(model: nn.Module, method: str | list[str]) -> list[str] | str:
    """Validate explicit targets: module leaf names, or one regex over full module names.

    Returns:
        The names as a list (peft matches them as suffixes), or the regex string (peft
        full-matches it against module names).

    Raises:
        RecipeError: a name (or the regex) matches no Linear module of the model; the message
            lists the Linear modules the model has.
    """
    linear = all_linear(model)
    full_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(method, str):
        if method in linear:
            return [method]
        try:
            rx = re.compile(method)
        except re.error as exc:
            raise RecipeError(f"lora_target_modules: {method!r} is neither a module name nor a "
                              f"valid regex ({exc}); T5 Linear modules: {', '.join(linear)}") from None
        if any(rx.fullmatch(n) for n in full_names):
            return method
        raise RecipeError(f"lora_target_modules: {method!r} matches no Linear module of this T5 "
                          f"model; its Linear modules are: {', '.join(linear)} "
                          "(or use auto = q,v / all-linear)")
    missing = [t for t in method if t not in linear]
    if missing:
        raise RecipeError(f"lora_target_modules: {missing} not in this T5 model; its Linear "
                          f"modules are: {', '.join(linear)} (or use auto = q,v / all-linear)")
    return list(method)
