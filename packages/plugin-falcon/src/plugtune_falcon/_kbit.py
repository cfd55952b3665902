"""A Falcon whose linear layers bitsandbytes can quantize.

transformers 5 replaces a module with ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` only when
``type(module) is nn.Linear`` (``integrations/bitsandbytes.py``, ``replace_with_bnb_linear``).
Falcon builds its projections from ``FalconLinear``, a subclass of ``nn.Linear`` whose forward is
``x @ W.T (+ b)``, so a 4-bit or 8-bit Falcon load silently keeps every layer in bf16 (the log
says "no linear modules were found"): QLoRA then trains a full-precision base and the memory
saving never happens. :class:`KbitFalconForCausalLM` swaps those layers for plain ``nn.Linear``
of the same shape before the weights are loaded; the parameter names (``weight``, ``bias``) and
the maths (``F.linear``) are the same, so the checkpoint loads unchanged.
"""

from __future__ import annotations

from torch import nn
from transformers import FalconForCausalLM
from transformers.models.falcon.modeling_falcon import FalconLinear


def plain_linears(model: nn.Module) -> int:
    """Replace every ``FalconLinear`` in ``model`` with an ``nn.Linear`` of the same shape,
    device and dtype (weights are not copied: call before loading a checkpoint).

    Returns:
        The number of layers replaced.
    """
    swaps = [(name, mod) for name, mod in model.named_modules() if type(mod) is FalconLinear]
    for name, mod in swaps:
        new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                        device=mod.weight.device, dtype=mod.weight.dtype)
        model.set_submodule(name, new)
    return len(swaps)


class KbitFalconForCausalLM(FalconForCausalLM):
    """``FalconForCausalLM`` with plain ``nn.Linear`` projections, for 4-bit / 8-bit loading."""

    def __init__(self, config):
        super().__init__(config)
        plain_linears(self)


def _clone_output(module, args, output):
    return output.clone() if output._base is not None else output


def clone_8bit_mlp_outputs(model: nn.Module) -> int:
    """Make the 8-bit ``dense_4h_to_h`` outputs ordinary tensors so Falcon can add into them.

    ``bitsandbytes``' ``MatMul8bitLt`` (a custom autograd Function) returns a *view* for 3-D
    inputs, and Falcon's decoder layer adds the attention output into the MLP output in place
    (``mlp_output += attention_output``); autograd forbids in-place changes of such views
    ("A view was created inside a custom Function ... modified inplace"), so every 8-bit Falcon
    training step fails. A forward hook clones the output when it is a view (one activation
    copy per layer).

    Returns:
        The number of hooked layers.
    """
    n = 0
    for name, mod in model.named_modules():
        if name.endswith("dense_4h_to_h") and type(mod).__name__ == "Linear8bitLt":
            mod.register_forward_hook(_clone_output)
            n += 1
    return n
