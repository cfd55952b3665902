"""Optional fused GPU kernels: Liger (``liger_kernel: true``, ``pip install 'plugtune[liger]'``).

Liger Kernel (linkedin/Liger-Kernel) replaces, per model instance, RMSNorm, RoPE, SwiGLU and the
LM head + cross-entropy with Triton kernels; its fused linear cross-entropy never builds the
``(tokens, vocab)`` logits. transformers applies it when ``TrainingArguments.use_liger_kernel``
is set (``transformers.integrations.liger.apply_liger_kernel``, which unwraps peft models and
passes ``liger_kernel_config`` to ``liger_kernel.transformers._apply_liger_kernel_to_instance``);
plugtune only decides whether that can work here and says so once when it cannot.

Liger's kernels are Triton programs for CUDA (and ROCm) devices. Where they cannot run (no CUDA
device, liger-kernel not installed, a model type Liger does not patch) plugtune prints one clear
notice and trains as without the key: on decoder-only models, with its own label-only LM head
(:func:`plugtune.modeling.label_only_loss`), which also skips the logits of prompt and padding
positions but still builds them for the trained ones.

axolotl's spelling (``plugins: [axolotl.integrations.liger.LigerPlugin]`` with ``liger_rope``,
``liger_rms_norm``, ``liger_glu_activation``, ``liger_layer_norm``, ``liger_cross_entropy``,
``liger_fused_linear_cross_entropy``) maps onto ``liger_kernel: true`` plus
``liger_kernel_config`` through :data:`AXOLOTL_KEYS`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

#: the switches of ``liger_kernel_config`` (keyword arguments of Liger's per-model
#: ``apply_liger_kernel_to_*`` functions, liger-kernel 0.6-0.8; each function takes the subset
#: its architecture has, and ``_apply_liger_kernel_to_instance`` drops the others)
LIGER_OPTIONS = ("rope", "rms_norm", "swiglu", "geglu", "layer_norm", "cross_entropy",
                 "fused_linear_cross_entropy")

#: axolotl's Liger keys (``axolotl/integrations/liger/args.py``) -> ``liger_kernel_config`` key
AXOLOTL_KEYS = {"liger_rope": "rope", "liger_rms_norm": "rms_norm",
                "liger_glu_activation": "swiglu", "liger_layer_norm": "layer_norm",
                "liger_cross_entropy": "cross_entropy",
                "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy"}

#: axolotl's plugin entries that switch Liger on
AXOLOTL_PLUGINS = ("axolotl.integrations.liger.LigerPlugin", "axolotl.integrations.liger")

INSTALL_HINT = "pip install 'plugtune[liger]'"


@dataclass(frozen=True)
class LigerPlan:
    """Whether Liger kernels will be applied to this run, and why not when they are not.

    Attributes:
        enabled: ``TrainingArguments(use_liger_kernel=True)`` will be set.
        config: the ``liger_kernel_config`` passed on (``{}`` = Liger's defaults for the model).
        reason: why ``liger_kernel: true`` cannot be honoured (``None`` when enabled or not asked).
    """

    enabled: bool
    config: dict = field(default_factory=dict)
    reason: str | None = None


def cuda_available() -> bool:
    """A CUDA (or ROCm) device is visible to torch."""
    return torch.cuda.is_available()


def liger_available() -> bool:
    """liger-kernel is importable (found without importing it: its import needs Triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_supported_model_types() -> frozenset[str] | None:
    """``config.model_type`` values Liger patches (``MODEL_TYPE_TO_APPLY_LIGER_FN``), or
    ``None`` when the table cannot be read (then any type is tried)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - liger absent or its Triton import failed
        return None
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


_NOTIFIED: set[str] = set()


def plan_liger(recipe, model_type: str | None = None, cuda: bool | None = None,
               available: bool | None = None) -> LigerPlan:
    """Decide whether this run uses Liger kernels; log one notice when asked for and impossible.

    Args:
        recipe: the validated :class:`plugtune.config.Recipe` (``liger_kernel``,
            ``liger_kernel_config``, ``adapter``).
        model_type: the routed ``config.model_type`` (checked against Liger's table).
        cuda: override :func:`cuda_available` (tests).
        available: override :func:`liger_available` (tests).

    Returns:
        A :class:`LigerPlan`. Never raises for a missing device or package: the run goes on
        with plugtune's label-only LM head.
    """
    if not recipe.liger_kernel:
        return LigerPlan(False)
    cfg = dict(recipe.liger_kernel_config or {})
    cuda = cuda_available() if cuda is None else cuda
    available = liger_available() if available is None else available
    reason = None
    if not cuda:
        reason = ("no CUDA device (Liger's kernels are Triton programs for GPUs); training with "
                  "plugtune's label-only LM head instead")
    elif not available:
        reason = f"liger-kernel is not installed ({INSTALL_HINT}); training without it"
    else:
        types = liger_supported_model_types()
        if types is not None and model_type is not None and model_type not in types:
            reason = (f"Liger has no kernels for model_type {model_type!r} (it patches: "
                      f"{', '.join(sorted(types))}); training without it")
    if reason is not None:
        if reason not in _NOTIFIED:  # one notice per process, not one per run/rank call
            _NOTIFIED.add(reason)
            log.warning("liger_kernel: true but %s", reason)
        return LigerPlan(False, cfg, reason)
    return LigerPlan(True, cfg)


def training_kwargs(plan: LigerPlan) -> dict:
    """The ``TrainingArguments`` keys for ``plan`` (empty when Liger is off)."""
    if not plan.enabled:
        return {}
    return {"use_liger_kernel": True, "liger_kernel_config": dict(plan.config) or None}


def axolotl_to_plugtune(data: dict) -> dict:
    """Map axolotl's Liger keys in a raw recipe mapping onto ``liger_kernel`` /
    ``liger_kernel_config``; returns a new mapping (other keys untouched).

    ``plugins`` entries other than Liger's are kept under ``plugins`` for the caller to judge.
    A ``liger_*`` key that is ``None`` means "Liger's default" and is left out of the config.
    """
    out = dict(data)
    plugins = out.pop("plugins", None)
    rest = []
    on = False
    for p in plugins or []:
        if str(p) in AXOLOTL_PLUGINS:
            on = True
        else:
            rest.append(p)
    if rest:
        out["plugins"] = rest
    cfg = dict(out.get("liger_kernel_config") or {})
    for key, opt in AXOLOTL_KEYS.items():
        if key in out:
            val = out.pop(key)
            if val is not None:
                cfg[opt] = bool(val)
    if on:  # axolotl ignores liger_* keys without its plugin; so does this mapping's switch
        out.setdefault("liger_kernel", True)
    if cfg:
        out["liger_kernel_config"] = cfg
    return out
