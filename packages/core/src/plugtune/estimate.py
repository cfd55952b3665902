"""Pre-flight memory estimate of a training run (``plugtune estimate RECIPE``).

The model is built on the ``meta`` device (no memory, no download of weights: only the config is
read), so parameter counts and the shapes of every layer are exact. Components (bytes, per GPU):

* **weights**: parameters x bytes of the load dtype. bitsandbytes NF4 (QLoRA) stores each
  quantized ``nn.Linear`` weight in 4 bits plus its quantization constants: with double
  quantization 8-bit absmax per block of 64 and one fp32 constant per 256 blocks, i.e.
  ``0.5 + 1/64 + 4/(64*256)`` bytes per parameter (Dettmers et al. 2023, arXiv:2305.14314, sec. 3:
  "0.127 bits per parameter" for the constants). LLM.int8() stores 1 byte per weight plus one
  fp32 scale per output row (Dettmers et al. 2022). Embeddings, norms and the output head stay in
  the compute dtype.
* **adapter**: LoRA adds ``r * (in + out)`` parameters per wrapped ``nn.Linear``
  (Hu et al. 2021, arXiv:2106.09685), kept in fp32 (peft's ``autocast_adapter_dtype``).
* **gradients**: one per trainable parameter, in its dtype.
* **optimizer states**: AdamW keeps two states (``exp_avg``, ``exp_avg_sq``) per trainable
  parameter in the parameter's dtype (``torch.optim.AdamW``; Loshchilov & Hutter 2019), so 8 bytes
  for fp32 trainables; 8-bit AdamW (bitsandbytes) 2 bytes; SGD none; Lion / Adafactor ~1 state.
* **activations**: what autograd saves for backward, per token and layer, generalising
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198, eq. 1: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer for a GPT layer in 16-bit)
  to pre-norm, gated-MLP, grouped-query models and to frozen weights. In elements per token:
  each norm saves its input (plus its normalised output when its weight trains); attention saves
  q, k, v and its output (``4h``, keys/values repeated to all heads), plus the ``a*s`` softmax
  probabilities with eager attention (the ``5as/h`` term; sdpa / flash attention save only a
  log-sum-exp); a gated MLP saves gate, activation and up outputs (``3i``), a plain MLP the
  activation input (``i``); a ``nn.Linear`` saves its input only when its weight trains, a LoRA
  branch saves its (dropout) input and a 1-byte dropout mask plus its ``r``-wide bottleneck.
  Outside the layers: the final norm, the head input and the fp32 log-softmax of the loss
  (``V`` per token).
  With gradient checkpointing (full recomputation, Korthikanti sec. 4.1; Chen et al. 2016) only
  each layer's input (``h`` per token) is kept, plus one layer's activations during recompute.
* **Pair methods** (``rl``: dpo, ipo, orpo, cpo, simpo, reward; KTO's KL batch likewise):
  chosen and rejected answers run as one batch of ``2b`` rows; full-weight DPO / IPO / KTO add
  a frozen reference copy of the weights (with LoRA the reference is the base with the adapter
  disabled: no copy; ORPO, CPO/SimPO and reward models have no reference).
* **backward working set**: while backward runs, gradients of the widest tensors are alive next
  to the saved activations: two fp32 ``V``-wide buffers for the loss, or three MLP-wide and two
  residual-wide ones for a layer, whichever is larger.
* **Mixture of experts**: every expert's weights are in memory, but a token passes through
  only ``k`` of the ``E`` routed experts of a block (plus attention, shared experts, router):
  ``active = total - routed x (1 - k/E)`` (:func:`plugtune.moe.parameter_counts`), reported
  next to the total. Activations count ``k`` gated expert MLPs per token and the router
  logits; LoRA on expert weights (``lora_target_parameters``) adds ``r * E * (in + out)`` per
  weight (peft's ``ParamWrapper``); routers are frozen in full fine-tuning by default.
* **peak** = weights + adapter + gradients + optimizer states + activations + backward working
  set. (Gradients and activations overlap only partly, so this leans high when both are large.)

With DeepSpeed ZeRO over N GPUs (Rajbhandari et al. 2020, arXiv:1910.02054): stage 1 divides the
optimizer states by N, stage 2 also the gradients, stage 3 also the weights; offload moves the
optimizer states (and with ``offload_param`` the weights) to CPU memory.

Checked against measured peaks of real training steps on tiny models
(``packages/core/tests/test_estimate.py``; :func:`measure_peak`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from plugtune import moe
from plugtune.config import Recipe

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + double-quantized constants, per parameter
_SHARED_INPUT = {  # Linear modules that read the same tensor (its input is saved once)
    "attn_in": {"q_proj", "k_proj", "v_proj", "q", "k", "v", "query_key_value", "qkv_proj",
                "Wqkv", "c_attn", "W_pack", "query", "key", "value"},
    "mlp_in": {"gate_proj", "up_proj", "gate_up_proj", "wi_0", "wi_1", "wi", "w1", "w3", "fc1",
               "dense_h_to_4h", "c_fc"},
}
_GATED = {"gate_proj", "gate_up_proj", "wi_0", "w1"}
_OPTIMIZER_STATES = {  # (states per trainable parameter, bytes per state or None = param dtype)
    "adamw": (2, None), "adam": (2, None), "adamw_8bit": (2, 1), "paged_adamw_8bit": (2, 1),
    "adamw_bnb_8bit": (2, 1), "sgd": (0, None), "lion": (1, None), "lion_8bit": (1, 1),
    "adafactor": (1, None), "adagrad": (1, None), "rmsprop": (1, None),
}

#: ``rl`` methods whose batches hold two sequences per example (TRL concatenates chosen and
#: rejected; KTO adds a KL batch of mismatched completions)
PAIR_METHODS = frozenset({"dpo", "ipo", "orpo", "cpo", "simpo", "reward", "kto"})
#: ``rl`` methods that keep a frozen reference model (a full copy without an adapter)
REFERENCE_METHODS = frozenset({"dpo", "ipo", "kto"})


def nf4_bytes(n: int, blocksize: int = 64) -> int:
    """Bytes of one bitsandbytes NF4 weight of ``n`` elements with double quantization: packed
    4-bit codes, one 8-bit absmax per block, one fp32 constant per 256 absmax blocks, and the
    16-entry NF4 and 256-entry nested code tables (fp32) of its quantization state."""
    blocks = -(-n // blocksize)
    return n // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)


class EstimateError(ValueError):
    """The estimate cannot be made (unknown architecture, bad memory size)."""


def parse_memory(text: str | int | float) -> int:
    """``"24GiB"`` / ``"80GB"`` / ``"512MiB"`` / a number of bytes -> bytes (int).

    Raises:
        EstimateError: an unknown unit or a malformed number.
    """
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise EstimateError(f"--device-memory {text!r}: expected a size like 24GiB, 80GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    """Bytes as a short binary-unit string (``1.50 GiB``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryEstimate:
    """Estimated memory of one training process, in bytes (see the module docstring)."""

    weights: int
    adapter: int
    gradients: int
    optimizer_states: int
    activations: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    backward_working_set: int
    peak: int
    params: int
    trainable_params: int
    details: dict[str, Any] = field(default_factory=dict)
    #: parameters one token passes through: ``params`` for a dense model; for MoE the routed
    #: experts count ``k/E`` of theirs (:func:`plugtune.moe.parameter_counts`)
    active_params: int | None = None

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= device_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meta_model(spec):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = spec.hf_config
    if cfg is None:
        raise EstimateError(f"{spec.path}: transformers cannot build its config; no estimate")
    if spec.task == "seq2seq":
        auto = AutoModelForSeq2SeqLM
    elif spec.task == "vision":
        from transformers import AutoModelForImageTextToText as auto
    else:
        auto = AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(cfg, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise EstimateError(f"cannot build {spec.model_type!r} from its config on the meta "
                            f"device: {exc}") from exc


def _layer_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost ModuleLists of repeated blocks (decoder layers; encoder and decoder stacks
    for seq2seq; T5's inner ``block.layer`` lists are inside a stack and skipped)."""
    cands = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and any(isinstance(x, nn.Linear) for x in m[0].modules())]

    def inside(a: nn.Module, b: nn.Module) -> bool:
        return a is not b and any(a is x for x in b.modules())

    return [m for m in cands if not any(inside(m, o) for o in cands)]


def _targets(spec, model, pm) -> list[nn.Linear] | None:
    """Full names of the Linear modules LoRA wraps (None for full fine-tuning); for MoE models
    the exact modules ``lora_config`` gives peft (:func:`plugtune.moe.resolve_targets`)."""
    if spec.recipe.adapter == "none":
        return None
    targets = pm.hook.plugtune_target_modules(spec=spec, model=model,
                                              method=spec.recipe.lora_target_modules)
    try:
        targets = moe.resolve_targets(model, targets,
                                      explicit=isinstance(spec.recipe.lora_target_modules, list))
    except moe.MoeError as exc:
        raise EstimateError(str(exc)) from None
    listed = moe.expert_linears(model)  # experts kept as nn.Linear layers (ModuleList)
    if listed and spec.recipe.lora_target_parameters in (moe.EXPERTS, [moe.EXPERTS]):
        targets = [*targets, *listed]
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.append(name)
    return names


def _layer_activation(layer: nn.Module, prefix: str, cfg, lora: set[str] | None, r: int,
                      dropout: float, attn: str, s: int, act_bytes: int,
                      dropout_mask_bytes: int, moe_inter: tuple[int, int, int] | None = None
                      ) -> float:
    """Bytes saved for backward per token by one block (see the module docstring).

    ``moe_inter``: ``(k, E, I)`` when the block holds fused routed experts (``k`` of ``E``
    experts of intermediate size ``I`` run per token, a gated MLP each).

    ``attn``: ``"flash_attention_2"`` (saves q, k, v at their own widths and the output),
    ``"sdpa"`` (plugtune batches always carry a padding mask or packed position ids, so
    transformers repeats k/v to all heads and passes an additive ``(b, 1, s, s)`` mask of the
    model dtype, which the kernel keeps: ``s`` more elements per token) or ``"eager"``
    (additionally the ``a*s`` softmax probabilities).
    """
    full = lora is None
    elems, extra_bytes = 0.0, 0.0
    groups: dict[str, int] = {}
    names = set()
    linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    for n, m in linears:
        leaf = n.rsplit(".", 1)[-1]
        names.add(leaf)
        group = next((g for g, members in _SHARED_INPUT.items() if leaf in members), n)
        key = f"{n.rsplit('.', 1)[0] if '.' in n else ''}:{group}"
        adapted = not full and f"{prefix}.{n}" in lora
        if full:
            groups[key] = m.in_features
        elif adapted:
            if dropout > 0:  # each LoRA branch draws its own dropout of the input, plus a mask
                elems += m.in_features
                extra_bytes += m.in_features * dropout_mask_bytes
            else:
                groups[key] = m.in_features
            elems += r  # lora_A output, saved by lora_B
    elems += sum(groups.values())
    h = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or h // heads)
    norms = [m for _, m in layer.named_modules() if "norm" in type(m).__name__.lower()]
    elems += len(norms) * h * (2 if full else 1)
    attn_blocks = max(1, sum(1 for n, _ in linears if n.rsplit(".", 1)[-1] in
                             {"o_proj", "o", "dense", "out_proj", "c_proj"} and "mlp" not in n))
    qh = heads * head_dim
    if attn == "flash_attention_2":
        elems += attn_blocks * (2 * qh + 2 * kv_heads * head_dim)
    else:
        elems += attn_blocks * 4 * qh  # q, k and v repeated to all heads, output
        extra_bytes += attn_blocks * s * act_bytes  # the additive mask, model dtype
        if attn == "eager":
            elems += attn_blocks * heads * s  # softmax probabilities
    mlp_in = [m for n, m in linears if n.rsplit(".", 1)[-1] in _SHARED_INPUT["mlp_in"]]
    if mlp_in or not moe_inter:  # a dense MLP (or an MoE block's shared experts)
        inter = max((m.out_features for m in mlp_in), default=4 * h)
        if "gate_up_proj" in names:
            inter //= 2
        elems += 3 * inter if names & _GATED else inter
    if moe_inter:  # k routed experts per token: gate, activation and up outputs, router logits
        k, e, i_moe = moe_inter
        elems += k * 3 * i_moe + e
    return elems * act_bytes + extra_bytes


def estimate(recipe: Recipe, pm=None, device: str | None = None, num_gpus: int = 1
             ) -> MemoryEstimate:
    """Estimate the peak memory of one training process for ``recipe`` (see module docstring).

    Args:
        recipe: the validated recipe (model, adapter, quantization, ``sequence_len``,
            ``micro_batch_size``, ``gradient_checkpointing``, ``optimizer``, ``deepspeed``).
        device: ``"cuda"`` or ``"cpu"``: resolves ``dtype: auto`` (bf16 on CUDA, fp32 on CPU);
            default: this machine's.
        num_gpus: data-parallel processes sharing ZeRO partitions (with ``deepspeed:``).

    Raises:
        EstimateError: the architecture cannot be built from its config.
    """
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    pm = pm or get_plugin_manager()
    spec = build_spec(recipe, pm)
    recipe = spec.recipe
    on_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    dtype = spec.torch_dtype
    if recipe.dtype == "auto":
        dtype = torch.bfloat16 if on_cuda else torch.float32
    if spec.quantization == "4bit":
        dtype = torch.bfloat16  # plugtune loads the unquantized modules of a 4-bit base in bf16
    wb = _DTYPE_BYTES[dtype]
    model = _meta_model(spec)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()

    # weights
    weights = 0.0
    for _, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            quant_linear = (isinstance(mod, nn.Linear) and pname == "weight" and mod is not out_emb)
            if spec.quantization == "4bit" and quant_linear:
                weights += nf4_bytes(p.numel())
            elif spec.quantization == "8bit" and quant_linear:
                weights += p.numel() + mod.out_features * 4
            else:
                weights += p.numel() * wb
    # adapter / trainable
    lora_names = _targets(spec, model, pm)
    r = recipe.lora_r
    if lora_names is None:  # full fine-tuning: all but the frozen MoE routers (plugtune.moe)
        frozen = 0 if recipe.moe_train_router else sum(
            p.numel() for n in moe.routers(model) for p in model.get_submodule(n).parameters())
        trainable, train_bytes, adapter = params - frozen, wb, 0
    else:
        mods = dict(model.named_modules())
        trainable = sum(r * (mods[n].in_features + mods[n].out_features) for n in lora_names)
        # lora_target_parameters: peft's ParamWrapper keeps A (in x r*E) and B (r*E x out)
        trainable += sum(r * ep * (i + o) for ep, i, o in _expert_lora_shapes(spec, model))
        for n in recipe.lora_modules_to_save or []:
            trainable += sum(p.numel() for name, p in model.named_parameters() if f".{n}." in
                             f".{name}")
        train_bytes = 4
        adapter = trainable * 4
    grads = trainable * train_bytes
    opt = (recipe.optimizer or "adamw_torch_fused").lower()
    key = next((k for k in sorted(_OPTIMIZER_STATES, key=len, reverse=True) if k in opt), "adamw")
    n_states, state_bytes = _OPTIMIZER_STATES[key]
    optim = trainable * n_states * (state_bytes or train_bytes)

    # activations
    b, s = recipe.micro_batch_size, recipe.sequence_len
    act_bytes = wb if spec.quantization is None else _DTYPE_BYTES[
        torch.bfloat16 if on_cuda else torch.float32]
    if spec.quantization == "4bit":
        act_bytes = 2  # bf16 compute dtype of the QLoRA base
    impl = recipe.attn_implementation or (
        "flash_attention_2" if recipe.flash_attention and on_cuda else "sdpa")
    h = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
    vocab = int(cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size)
    stacks = _layer_stacks(model)
    if not stacks:
        raise EstimateError(f"{spec.model_type}: no repeated layers found to size activations")
    names_of = {id(m): n for n, m in model.named_modules()}
    lora = set(lora_names) if lora_names is not None else None
    moe_counts = moe.parameter_counts(model)
    moe_blocks = moe.find_moe_blocks(model)
    per_layer = []
    for stack in stacks:
        prefix = names_of[id(stack)]
        for k, layer in enumerate(stack):
            where = f"{prefix}.{k}."
            per_layer.append(_layer_activation(
                layer, f"{prefix}.{k}", cfg, lora, r, recipe.lora_dropout, impl, s, act_bytes,
                1 if on_cuda else act_bytes,  # dropout masks: bool on CUDA, input dtype on CPU
                _moe_inter(model, moe_counts, [b for b in moe_blocks
                                               if b.experts.startswith(where)], h)))
    # pair methods score chosen and rejected answers in one batch of 2b rows (TRL concatenates
    # them); KTO runs its KL batch (mismatched completions) beside the batch
    method = "reward" if recipe.reward_model else recipe.rl
    tokens = b * s * (2 if method in PAIR_METHODS else 1)
    # final norm (+ head input when the head trains) and the fp32 log-softmax of the loss
    outside = (h * (2 if lora is None else 1) + (h if lora is None else 0)) * act_bytes + vocab * 4
    no_gc = tokens * (sum(per_layer) + outside)
    with_gc = tokens * (len(per_layer) * h * act_bytes + max(per_layer) + outside)
    activations = with_gc if recipe.gradient_checkpointing else no_gc
    # backward working set: the loss backward holds two fp32 V-wide buffers; a layer's backward
    # holds gradients of its widest tensors (three MLP-wide, two residual-wide)
    inter = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)
                 and m is not out_emb), default=4 * h)
    working = tokens * max(2 * vocab * 4, (3 * inter + 2 * h) * act_bytes)

    reference = 0.0
    if method in REFERENCE_METHODS and lora_names is None:
        reference = weights  # full-weight DPO / KTO keep a frozen copy of the initial model
    weights += reference
    # DeepSpeed ZeRO partitioning
    details: dict[str, Any] = {
        "dtype": str(dtype).replace("torch.", ""), "quantization": spec.quantization,
        "adapter": recipe.adapter, "lora_modules": len(lora_names or []),
        "optimizer": recipe.optimizer, "optimizer_state_bytes_per_param":
            n_states * (state_bytes or train_bytes),
        "micro_batch_size": b, "sequence_len": s, "layers": len(per_layer),
        "hidden_size": h, "vocab_size": vocab, "attention": impl,
        "gradient_checkpointing": recipe.gradient_checkpointing, "device": "cuda" if on_cuda else "cpu",
        "rl": recipe.rl, "dpo_reference_copy": int(reference),
    }
    if moe_counts:
        details["moe"] = moe_counts
    stage = 0
    if recipe.deepspeed:
        from plugtune.scale import deepspeed_config

        zero = deepspeed_config(recipe.deepspeed).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        n = max(1, num_gpus)
        offload_opt = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        offload_par = zero.get("offload_param", {}).get("device", "none") != "none"
        cpu = 0.0
        if stage >= 1:
            optim /= n
        if stage >= 2:
            grads /= n
        if stage >= 3:
            weights /= n
            adapter /= n
        if offload_opt:
            cpu += optim
            optim = 0
        if offload_par:
            cpu += weights
            weights = 0
        details.update(zero_stage=stage, num_gpus=n, offloaded_to_cpu=int(cpu))
    peak = weights + adapter + optim + grads + activations + working
    return MemoryEstimate(
        weights=int(weights), adapter=int(adapter), gradients=int(grads),
        optimizer_states=int(optim), activations=int(activations),
        activations_with_checkpointing=int(with_gc), activations_without_checkpointing=int(no_gc),
        backward_working_set=int(working), peak=int(peak), params=int(params),
        trainable_params=int(trainable), details=details,
        active_params=int(moe_counts["active_params"]) if moe_counts else int(params))


def _expert_lora_shapes(spec, model) -> list[tuple[int, int, int]]:
    """``(experts, in, out)`` of each weight ``lora_target_parameters`` adapts (``[]``: none)."""
    asked = getattr(spec.recipe, "lora_target_parameters", None)
    if not asked or (asked in (moe.EXPERTS, [moe.EXPERTS]) and moe.expert_linears(model)):
        return []  # none, or experts as nn.Linear layers (counted with the LoRA modules)
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    out = []
    try:
        names = moe.expert_parameters(model, asked)
    except moe.MoeError as exc:
        raise EstimateError(str(exc)) from None
    for full in names:
        p = params[full]
        if p.dim() == 2:
            out.append((1, int(p.shape[1]), int(p.shape[0])))
            continue
        transposed = getattr(mods[full.rsplit(".", 1)[0]], "is_transposed", False)
        e, a, b = (int(x) for x in p.shape)
        out.append((e, a, b) if transposed else (e, b, a))
    return out


def _moe_inter(model, counts, blocks, hidden: int) -> tuple[int, int, int] | None:
    """``(k, E, I)`` of the fused routed experts in ``blocks`` (one layer's), else ``None``."""
    if not counts or not blocks:
        return None
    params = dict(model.named_parameters())
    down = [params[p] for p in blocks[0].expert_params if p.endswith("down_proj")]
    if not down:
        return None
    _, a, b = down[0].shape
    inter = int(b if a == hidden else a)
    return counts["experts_per_token"], counts["num_experts"], inter


# ---------------------------------------------------------------------------------------------
# measurement (to check the estimate)


def _limit_malloc_caching() -> None:
    """Make glibc return freed blocks of 64 KiB and more to the OS at once (``mallopt``), so the
    resident set follows the live tensors (no-op where glibc is absent)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also turns off its dynamic adjustment)
        libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD: trim the heap top at once
    except (OSError, AttributeError):
        pass


def _rss() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in bytes (Linux ``/proc/self/status``)."""
    from plugtune.observe import proc_status_kib

    vals = proc_status_kib(keys=("VmRSS", "VmHWM"))
    return vals["VmRSS"] * 1024, vals["VmHWM"] * 1024


def measure_in_process(recipe: Recipe) -> dict[str, Any]:
    """Train ``recipe`` (use a small ``max_steps``) here and measure the peak memory of training.

    On CUDA: ``torch.cuda.max_memory_allocated`` from the start of training. On CPU (Linux): the
    model's parameter + buffer bytes plus the growth of the resident set above its size when
    training starts (high-water mark reset through ``/proc/self/clear_refs``; freed tensors are
    returned to the OS at once, see :func:`_limit_malloc_caching`).

    Returns:
        ``{"measured_peak": bytes, "weights_bytes": bytes, ...}``.
    """
    import gc

    import plugtune.train as T
    import plugtune.trainer as TR  # the methods build their callbacks from plugtune.trainer

    result: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    if not cuda:
        _limit_malloc_caching()

    class Probe(TR.CompleteCheckpointCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            gc.collect()  # garbage of earlier runs must not be freed (and shrink RSS) mid-run
            result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) \
                + sum(b.numel() * b.element_size() for b in model.buffers())
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
                result["rss_start"] = _rss()[0]

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                result["measured_peak"] = torch.cuda.max_memory_allocated()
            else:
                result["rss_peak"] = _rss()[1]
                result["measured_peak"] = (result["weights_bytes"] + result["rss_peak"]
                                           - result["rss_start"])

    original = TR.CompleteCheckpointCallback
    TR.CompleteCheckpointCallback = Probe
    try:
        T.train(recipe)
    finally:
        TR.CompleteCheckpointCallback = original
    if "measured_peak" not in result:
        raise EstimateError("the memory probe never ran: the training method did not use "
                            "plugtune.trainer.CompleteCheckpointCallback")
    return result


def _measure_child(recipe_json: str, queue) -> None:  # pragma: no cover - runs in a subprocess
    from plugtune.config import validate_recipe

    torch.set_num_threads(1)
    queue.put(measure_in_process(validate_recipe(json.loads(recipe_json))))


def measure_peak(recipe: Recipe, timeout: float = 900) -> dict[str, Any]:
    """:func:`measure_in_process` in a fresh (spawned) process, so nothing allocated before
    counts or is reused. Returns its dict."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_measure_child, args=(json.dumps(recipe.model_dump(mode="json")), q))
    proc.start()
    try:
        return q.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def format_estimate(est: MemoryEstimate, device_bytes: int | None = None) -> list[tuple[str, str]]:
    """Rows ``(component, size)`` for printing."""
    d = est.details
    rows = [
        ("parameters", f"{est.params:,} ({est.trainable_params:,} trainable)"),
    ]
    if "moe" in d:
        m = d["moe"]
        shared = f" + {m['shared_experts']} shared" if m["shared_experts"] else ""
        rows.append((f"active per token (MoE: {m['experts_per_token']} of {m['num_experts']} "
                     f"routed experts{shared}; all {est.params:,} stay in memory)",
                     f"{m['active_params']:,} "
                     f"({100 * m['active_params'] / max(est.params, 1):.1f}%)"))
    rows += [
        (f"weights ({d['quantization'] or d['dtype']})", human(est.weights)),
        ("adapter (fp32)", human(est.adapter)),
        ("gradients", human(est.gradients)),
        (f"optimizer states ({d['optimizer']}, {d['optimizer_state_bytes_per_param']} B/param)",
         human(est.optimizer_states)),
        (f"activations, no checkpointing (b={d['micro_batch_size']}, s={d['sequence_len']})",
         human(est.activations_without_checkpointing)),
        ("activations, gradient checkpointing", human(est.activations_with_checkpointing)),
        ("backward working set", human(est.backward_working_set)),
        ("peak (sum of the above, with the recipe's checkpointing)", human(est.peak)),
    ]
    if "zero_stage" in d:
        rows.append((f"ZeRO-{d['zero_stage']} over {d['num_gpus']} GPUs, offloaded to CPU",
                     human(d["offloaded_to_cpu"])))
    if device_bytes:
        verdict = "fits" if est.fits(device_bytes) else "does NOT fit"
        rows.append((f"device memory {human(device_bytes)}",
                     f"{verdict} ({100 * est.peak / device_bytes:.0f}% used)"))
    return rows
