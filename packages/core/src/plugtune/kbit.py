"""Guards around 4-bit (bitsandbytes) bases: compute dtype, and the CPU kernel's shape limits.

* :func:`kbit_dtype`: ``dtype: fp16`` with a 4-bit base is the QLoRA trap (fp16 autocast over
  NF4 weights underflows: the loss goes to exactly 0, then NaN). bf16 is used instead where the
  device has it; elsewhere a warning names the risk (and the trainer stops on a loss stuck at 0,
  :class:`plugtune.run_control.LossGuard`).
* :func:`cpu_4bit_fallback`: in eval mode without gradients, bitsandbytes' ``Linear4bit.forward``
  repacks the weight for its AVX512-BF16 CPU kernel (``_convert_weight_packed_for_cpu``), which
  needs ``out_features % 32 == 0`` and ``in_features % blocksize == 0``; other shapes crash
  (``N must be divisible by block_n``, ``shape '[32, 0]' is invalid``). Those layers are switched
  to bitsandbytes' generic path (de-quantize, then matmul), the one training already uses.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: bitsandbytes' CPU packing block along the output dimension (``block_n`` default)
CPU_BLOCK_N = 32


def kbit_dtype(dtype: torch.dtype, quantization: str | None,
               bf16_available: bool | None = None) -> tuple[torch.dtype, str | None]:
    """The dtype to use for a run with ``quantization`` and the notice to print (or ``None``).

    ``bf16_available``: whether the device computes in bf16 (default: a CUDA device with bf16).
    """
    if quantization != "4bit" or dtype != torch.float16:
        return dtype, None
    if bf16_available is None:
        from plugtune.spec import cuda_supports_bf16

        bf16_available = cuda_supports_bf16()
    if bf16_available:
        return torch.bfloat16, ("dtype: fp16 with a 4-bit base underflows (loss 0, then NaN); "
                                "using bf16, which this device supports")
    return dtype, ("dtype: fp16 with a 4-bit base can underflow (loss exactly 0, then NaN) and this "
                   "device has no bf16; watch the loss, or use dtype: fp32")


def unsupported_cpu_4bit_layers(model) -> list[tuple[str, tuple[int, int]]]:
    """``(name, (out_features, in_features))`` of the ``Linear4bit`` layers whose shape the
    packed CPU kernel cannot take."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    bad = []
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear4bit):
            continue
        qs = getattr(mod.weight, "quant_state", None)
        block = getattr(qs, "blocksize", 64) or 64
        n, k = mod.out_features, mod.in_features
        if n % CPU_BLOCK_N or k % block or k % 2:
            bad.append((name, (n, k)))
    return bad


def cpu_4bit_fallback(model) -> int:
    """Route the ``Linear4bit`` layers of ``model`` whose shape the packed CPU kernel cannot take
    to bitsandbytes' generic (de-quantizing) path; returns how many were switched (one notice
    is logged). A no-op for models without such layers."""
    bad = unsupported_cpu_4bit_layers(model)
    if not bad:
        return 0
    names = {n for n, _ in bad}
    for name, mod in model.named_modules():
        if name in names:
            mod.support_avx512bf16_for_cpu = False
    shapes = sorted({s for _, s in bad})
    log.warning("bitsandbytes' packed CPU 4-bit kernel cannot take %d layer(s) of shape(s) %s "
                "(it needs out_features %% %d == 0 and in_features %% blocksize == 0); they "
                "evaluate and generate through de-quantized weights instead", len(bad),
                ", ".join(f"{n}x{k}" for n, k in shapes), CPU_BLOCK_N)
    return len(bad)


def cpu_4bit_training_guard(model) -> int:
    """Keep every ``Linear4bit`` layer of ``model`` off bitsandbytes' packed CPU inference format
    for the whole training run; returns how many layers were set.

    bitsandbytes converts a layer's weight to its packed AVX512-BF16 layout the first time it runs
    in eval mode without gradients (plugtune's one-off label-only-loss check, an evaluation during
    training) and keeps it there, so the *next training* forward takes the inference kernel, whose
    in-place bias add fails on layers with a bias (BLOOM, Falcon): "a view of a leaf Variable that
    requires grad is being used in an in-place operation". A no-op on CUDA and for models without
    4-bit layers."""
    import torch

    if torch.cuda.is_available():
        return 0
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n
