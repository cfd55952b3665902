"""Legacy ``RefinedWeb`` / ``RefinedWebModel`` checkpoints mapped to the native Falcon classes.

The first Falcon releases (tiiuae/falcon-7b, -40b, -rw-1b, -rw-7b before the in-library port)
shipped remote code (``configuration_RW.py`` / ``modelling_RW.py``, ``RWForCausalLM``) and a
``config.json`` with ``model_type: RefinedWebModel`` (7B family: multi-query, one layer norm)
or ``RefinedWeb`` (40B family: grouped KV heads ``n_head_kv``, separate ``ln_attn`` / ``ln_mlp``).
The weights use the same module names as transformers' native ``FalconForCausalLM`` (which was
ported from that code), so only the config needs translating; no remote code runs.

Key mapping (``configuration_RW.py`` -> ``FalconConfig``): ``n_head`` -> ``num_attention_heads``,
``n_layer`` -> ``num_hidden_layers``, ``n_head_kv`` -> ``num_kv_heads``, ``n_embed`` ->
``hidden_size``. ``RefinedWeb`` implies ``new_decoder_architecture=True`` with two layer norms
(``num_ln_in_parallel_attn=2``), as in transformers' own conversion of falcon-40b.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LEGACY_TYPES = ("RefinedWeb", "RefinedWebModel")

_RENAMES = {
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
    "n_embed": "hidden_size",
}
# bookkeeping keys of the remote-code config that FalconConfig must not receive
_DROP = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
         "_name_or_path")
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def legacy_to_kwargs(raw: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Translate a legacy RefinedWeb config mapping into ``FalconConfig`` keyword arguments.

    Args:
        raw: the parsed ``config.json``.
        source: file name used in error messages.

    Raises:
        ModelLoadError: required keys are missing, or the config uses a feature the native
            Falcon classes lack (``apply_residual_connection_post_layernorm: true``).
    """
    from plugtune.modeling import ModelLoadError

    mt = raw.get("model_type")
    if mt not in LEGACY_TYPES:
        raise ModelLoadError(f"{source}: model_type {mt!r} is not a legacy Falcon type "
                             f"({', '.join(LEGACY_TYPES)})")
    if raw.get("apply_residual_connection_post_layernorm"):
        raise ModelLoadError(
            f"{source}: apply_residual_connection_post_layernorm: true is not supported by "
            "transformers' native Falcon (no released Falcon checkpoint uses it)")
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _DROP or key == "apply_residual_connection_post_layernorm":
            continue
        kw[_RENAMES.get(key, key)] = value
    if mt == "RefinedWeb":
        kw.setdefault("new_decoder_architecture", True)
        kw.setdefault("num_ln_in_parallel_attn", 2)
    else:
        kw.setdefault("new_decoder_architecture", False)
        kw.setdefault("multi_query", True)
    missing = [k for k in _REQUIRED if k not in kw]
    if missing:
        names = {v: k for k, v in _RENAMES.items()}
        raise ModelLoadError(f"{source}: legacy {mt} config lacks "
                             f"{', '.join(names.get(k, k) for k in missing)}")
    return kw


def falcon_config_from_legacy(path: str | Path):
    """``FalconConfig`` for the legacy checkpoint folder ``path`` (reads its ``config.json``).

    Raises:
        ModelLoadError: no/invalid ``config.json``, missing keys, or values of the wrong type
            (the message names the file and the field).
    """
    from transformers import FalconConfig

    from plugtune.modeling import ModelLoadError

    cfg_file = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file}: cannot read the legacy Falcon config: {exc}") from exc
    kw = legacy_to_kwargs(raw, str(cfg_file))
    try:
        return FalconConfig(**kw)
    except Exception as exc:  # strict dataclass validation: wrong types
        raise ModelLoadError(f"{cfg_file}: invalid legacy Falcon config: {exc}") from exc
