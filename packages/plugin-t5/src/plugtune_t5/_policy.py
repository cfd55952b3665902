"""The T5 numeric policy: never fp16.

T5 v1.1 / FLAN-T5 / mT5 checkpoints were pre-trained in bf16 on TPUs; some of their
feed-forward activations exceed fp16's maximum (65504), so in fp16 they overflow to ``inf`` and
the loss turns NaN (transformers issues #10830 and #14189; the T5 docs' "T5 ... fp16" note).
bf16 has fp32's exponent range and is safe; fp32 is always safe.
"""

from __future__ import annotations

import logging
import warnings

import torch

from plugtune.spec import ModelSpec, cuda_supports_bf16

log = logging.getLogger(__name__)


class T5PrecisionWarning(UserWarning):
    """A recipe asked for a precision T5 cannot train in; plugtune chose a safe one instead."""


def safe_dtype(spec: ModelSpec) -> torch.dtype:
    """The dtype a T5-family model is loaded and trained in.

    ``fp16`` (from ``dtype: fp16``) becomes bf16 on CUDA devices that support it, else fp32,
    with a :class:`T5PrecisionWarning` that says why. Every other choice of the core dtype
    policy (``auto`` -> bf16 on bf16-capable CUDA, fp32 elsewhere; explicit ``bf16``/``fp32``)
    is kept.

    Returns:
        ``torch.bfloat16`` or ``torch.float32`` (never ``torch.float16``).
    """
    if spec.torch_dtype != torch.float16:
        return spec.torch_dtype
    safe = torch.bfloat16 if cuda_supports_bf16() else torch.float32
    name = "bf16" if safe == torch.bfloat16 else "fp32 (this device has no bf16)"
    msg = (f"dtype: fp16 was requested for {spec.path} ({spec.model_type}), but T5-family models "
           "overflow in fp16: FLAN-T5/T5 v1.1/mT5 feed-forward activations exceed 65504 and the "
           f"loss turns NaN. Training in {name} instead; set dtype: bf16 or fp32 to silence this.")
    warnings.warn(msg, T5PrecisionWarning, stacklevel=3)
    log.warning(msg)
    return safe


def kbit_quantization_config(spec: ModelSpec, dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for a quantized T5 base, or ``None`` to use core's default.

    4-bit: NF4 + double quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) with the
    compute dtype of :func:`safe_dtype` (bf16 where CUDA has it, else fp32: core's default of
    bf16 compute is ~22x slower on CPUs without AMX and fp16 is unsafe for T5). 8-bit
    (LLM.int8(), Dettmers et al. 2022) keeps core's config; T5's ``wo`` stays unquantized in fp32
    (``T5PreTrainedModel._keep_in_fp32_modules``).
    """
    if spec.quantization != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
