"""LoRA target discovery for vision-language models: the language model only, by default.

peft has no default LoRA targets for mllama / qwen2_vl / qwen2_5_vl / molmo2, and
``target_modules="all-linear"`` would also wrap the vision tower and the projector (their
layers share names with the language model's: ``q_proj``, ``gate_proj`` ...). So targets are
returned as one regex over full module names, anchored on the language model (the module that
owns the input embeddings), which ``peft`` matches with ``re.fullmatch``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from plugtune.modeling import linear_module_names


def language_model_prefix(model: nn.Module) -> str:
    """Dotted name of the language model inside ``model``: the parent of the input embeddings
    (``model.language_model`` for every native family here).

    Raises:
        ValueError: the input embeddings are not found among the named modules.
    """
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if mod is emb:
            return name.rsplit(".", 1)[0] if "." in name else ""
    raise ValueError("cannot locate the language model: the input embeddings are not a submodule")


def cross_attention_layers(model: nn.Module) -> list[int]:
    """Indices of cross-attention decoder layers (Mllama ``text_config.cross_attention_layers``)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return list(getattr(text, "cross_attention_layers", None) or [])


def lm_target_regex(model: nn.Module, names: Sequence[str] | None = None,
                    include_cross_attention: bool = False) -> str:
    """A regex selecting the language model's ``nn.Linear`` modules for LoRA.

    Args:
        model: the vision-language model (before PEFT wrapping).
        names: leaf names to keep (``None``: every Linear leaf of the language model, i.e.
            ``all-linear`` restricted to it; the output head is never included).
        include_cross_attention: also adapt the cross-attention decoder layers (Mllama);
            otherwise they are excluded.

    Raises:
        ValueError: a requested name is not a Linear of the language model (lists the ones it
            has), or cross-attention was asked for on a model without such layers.
    """
    prefix = language_model_prefix(model)
    within = f"^{re.escape(prefix)}\\." if prefix else None
    available = linear_module_names(model, within=within)
    if names is None:
        leaves = available
    else:
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"lora_target_modules {missing} are not Linear modules of the language "
                             f"model ({prefix or 'root'}); it has: {', '.join(available)}")
        leaves = list(names)
    xattn = cross_attention_layers(model)
    if include_cross_attention and not xattn:
        raise ValueError("lora_target_cross_attention: true, but this model has no "
                         "cross-attention layers (only Llama 3.2 Vision / mllama has them)")
    skip = ""
    if xattn and not include_cross_attention:
        skip = "(?!layers\\.(?:" + "|".join(str(i) for i in xattn) + ")\\.)"
    head = f"{re.escape(prefix)}\\." if prefix else ""
    return f"^{head}{skip}(?:.*\\.)?(?:{'|'.join(re.escape(n) for n in leaves)})$"


def targets_for(model: nn.Module, method: str | list[str], include_cross_attention: bool) -> str:
    """Targets for the recipe's ``lora_target_modules``.

    * ``auto`` / ``all-linear``: every Linear of the language model (minus cross-attention
      layers unless ``include_cross_attention``);
    * a list of names (or one bare name): those names, inside the language model only;
    * any other string: a regex used verbatim (``re.fullmatch`` on full module names): the
      way to ask for the vision tower or projector too. It must match at least one module.

    Raises:
        ValueError: unknown names, or a regex matching nothing.
    """
    if method in ("auto", "all-linear"):
        return lm_target_regex(model, None, include_cross_attention)
    if isinstance(method, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", method):
        if not any(re.fullmatch(method, n) for n, _ in model.named_modules()):
            raise ValueError(f"lora_target_modules regex {method!r} matches no module")
        return method
    names = [method] if isinstance(method, str) else list(method)
    return lm_target_regex(model, names, include_cross_attention)
