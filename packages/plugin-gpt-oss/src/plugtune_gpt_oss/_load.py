"""gpt-oss loading and packing quirks (transformers 5.25).

Attention. gpt-oss adds a learned per-head "sink" logit to every softmax denominator
(``GptOssAttention.sinks``, passed as ``s_aux``). ``torch.nn.functional.scaled_dot_product_attention``
has no such term, so ``GptOssPreTrainedModel._supports_sdpa = False`` and loading with
``attn_implementation="sdpa"`` raises. What works: ``eager`` (everywhere), ``flex_attention``,
and the hub kernels the model class lists in ``_compatible_flash_implementations``
(``kernels-community/vllm-flash-attn3`` on Hopper GPUs, with the ``kernels`` package and hub
access). :func:`choose_attention` keeps a recipe's supported choice and otherwise falls back to
``eager`` with one notice.

MXFP4. The released checkpoints store the MoE expert weights in MXFP4 (``config.json``:
``quantization_config.quant_method == "mxfp4"``). transformers cannot train through them
(``Mxfp4HfQuantizer.is_trainable`` is ``False`` unless dequantized), so :func:`load_kwargs`
passes ``Mxfp4Config(dequantize=True)``: the experts are unpacked to bf16 at load time
(about 4x the checkpoint's expert bytes: gpt-oss-20b ~ 42 GB of bf16 weights).

Packing. ``GptOssModel.forward`` builds its causal masks without ``position_ids``
(``create_causal_mask(config, inputs_embeds, attention_mask, cache)``), so a packed row (position
ids restarting at 0, no attention mask) lets every sample attend to the samples before it
(measured on a tiny model: max |logit difference| 0.39 against the sample alone).
Core's :func:`plugtune.architectures.install_packed_masks` (a forward pre-hook that
``plugtune.modeling.load_model`` installs for packed runs) builds the masks transformers' own mask
functions make when they are given the position ids, so packed rows train exactly like unpacked
ones; the router auxiliary loss then counts every position of a packed row, as with no mask.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: attention implementations gpt-oss runs in transformers 5.25 (besides hub kernels named
#: ``kernels-community/...``, which ``_compatible_flash_implementations`` lists)
SUPPORTED = ("eager", "flex_attention")
#: the kernel used for ``flash_attention: true`` on CUDA when the ``kernels`` package is installed
FLASH_KERNEL = "kernels-community/vllm-flash-attn3"


def _kernels_usable() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("kernels") is not None


def choose_attention(recipe, model_cls=None) -> tuple[str, str | None]:
    """The attention implementation to load gpt-oss with, and the notice to print (or ``None``).

    Args:
        recipe: the validated recipe (``attn_implementation``, ``flash_attention``).
        model_cls: the model class (default ``GptOssForCausalLM``), read for
            ``_compatible_flash_implementations``.

    Returns:
        ``(implementation, notice)``: the recipe's choice when gpt-oss supports it; for
        ``flash_attention: true`` / ``flash_attention_2`` the vllm-flash-attn3 hub kernel on CUDA
        with ``kernels`` installed; ``eager`` otherwise, with a one-line notice saying why.
    """
    if model_cls is None:
        from transformers import GptOssForCausalLM as model_cls
    kernels = tuple(getattr(model_cls, "_compatible_flash_implementations", ()) or ())
    asked = recipe.attn_implementation
    wants_flash = bool(recipe.flash_attention) or asked == "flash_attention_2"
    if asked in SUPPORTED or (asked and asked in kernels):
        return asked, None
    if wants_flash:
        if FLASH_KERNEL in kernels and _kernels_usable():
            return FLASH_KERNEL, f"gpt-oss: flash attention via the {FLASH_KERNEL} hub kernel"
        return "eager", ("gpt-oss: flash-attn 2 has no attention sinks and the "
                         f"{FLASH_KERNEL} kernel needs CUDA and the `kernels` package; "
                         "using eager attention")
    if asked:
        return "eager", (f"gpt-oss: attn_implementation {asked!r} is not supported (attention "
                         "sinks: eager, flex_attention or a kernels-community kernel); using eager")
    return "eager", "gpt-oss: eager attention (sdpa has no attention sinks)"


def is_mxfp4(hf_config) -> bool:
    """Whether a config (``PretrainedConfig`` or ``config.json`` dict) declares MXFP4 weights."""
    qc = hf_config.get("quantization_config") if isinstance(hf_config, dict) else getattr(
        hf_config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "mxfp4"


def load_kwargs(spec) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """Keyword arguments for ``plugtune.modeling.load_model`` and the notices to print, as
    ``(logging level, line)``: a warning when the recipe's attention choice is replaced or MXFP4
    is dequantized, info for the default eager attention.

    ``attn_implementation`` from :func:`choose_attention`; for an MXFP4 checkpoint
    (:func:`is_mxfp4` on ``spec.hf_config``) ``quantization_config=Mxfp4Config(dequantize=True)``
    and ``dtype=torch.bfloat16``.

    Raises:
        plugtune.modeling.ModelLoadError: an MXFP4 checkpoint with ``load_in_4bit`` /
            ``load_in_8bit`` (bitsandbytes cannot quantize what is already MXFP4 at load).
    """
    import torch

    from plugtune.modeling import ModelLoadError

    impl, notice = choose_attention(spec.recipe)
    kwargs: dict[str, Any] = {"attn_implementation": impl}
    asked = spec.recipe.attn_implementation or spec.recipe.flash_attention
    notes = [(logging.WARNING if asked else logging.INFO, notice)] if notice else []
    if spec.hf_config is not None and is_mxfp4(spec.hf_config):
        if spec.quantization is not None:
            raise ModelLoadError(
                f"{spec.path}: the checkpoint is MXFP4-quantized; load_in_{spec.quantization} "
                "cannot re-quantize it. Remove load_in_4bit/load_in_8bit (adapter: lora): "
                "plugtune dequantizes MXFP4 to bf16 for training")
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        kwargs["dtype"] = torch.bfloat16
        notes.append((logging.WARNING, "gpt-oss: MXFP4 checkpoint dequantized to bf16 for "
                      "training (transformers Mxfp4Config(dequantize=True))"))
    return kwargs, notes
