"""Mixture-of-Experts models, correct by construction: which modules LoRA wraps, the router,
the router's auxiliary (load-balancing) loss, and total versus active parameters.

A model is MoE when its (text) config names a number of routed experts
(:data:`NUM_EXPERTS_KEYS`). Its blocks are then found from the module tree, not from a table
of class names, so every architecture transformers adds is covered the day it lands:

* **expert container**: a module holding one 3-D parameter per projection with the experts
  stacked on dimension 0 (transformers 5 fuses the experts: ``experts.gate_up_proj`` of shape
  ``(E, 2*I, H)`` or ``(E, H, 2*I)``), or an ``nn.ModuleList`` of ``E`` expert MLPs (older and
  remote-code models);
* **MoE block**: the parent of an expert container;
* **router**: the module inside the block (outside the experts) whose 2-D ``weight`` has ``E``
  rows (Mixtral's ``MixtralTopKRouter``, Llama 4's ``Llama4Router`` — an ``nn.Linear`` subclass
  that returns a tuple —, DeepSeek-V3's ``DeepseekV3TopkRouter``, gpt-oss' ``GptOssTopKRouter``);
* **shared experts**: the block's other children with parameters (always active).

LoRA targets (:func:`lora_targets`): ``auto`` wraps the attention projections (peft's own
default for the model type where it has one, e.g. Mixtral ``q_proj, v_proj``), ``all-linear``
every ``nn.Linear`` but the head, the routers and the routed experts. Names are returned in
full (``model.layers.0.self_attn.q_proj``): peft >= 0.19 rewrites leaf names of models whose
experts transformers 5 fused (``gate_proj`` -> the experts' ``gate_up_proj``), which would put a
``ParamWrapper`` on the routed experts behind the user's back (DeepSeek-V3's shared experts are
named like its routed ones). Routed experts are opt-in through ``lora_target_parameters``
(axolotl's key, peft's ``target_parameters``; ``experts`` = every fused expert weight), which
needs ``lora_dropout: 0`` (peft's ``ParamWrapper`` cannot apply dropout to the input of a
parameter).

The router stays frozen (LoRA and full fine-tuning) unless ``moe_train_router: true``: neither
axolotl nor LLaMA-Factory freeze it (LLaMA-Factory's ``lora_target: all`` reaches it through peft's
conversion, full fine-tuning trains it), but a router moved by a small fine-tuning set shifts
which experts every later token uses, the largest change a small run can make to a model it
cannot see most of.

The auxiliary loss (Switch Transformer, Fedus et al. 2022, arXiv:2101.03961, eq. 4; transformers'
``load_balancing_loss_func``) is on when the model computes one itself (it keeps
``router_aux_loss_coef`` as an attribute and adds ``coef * aux_loss`` to ``out.loss`` when
``output_router_logits`` is set: Mixtral, Qwen2/3-MoE, gpt-oss, OLMoE, ...);
``moe_aux_loss_coef`` (LLaMA-Factory's key) overrides the coefficient, ``0`` turns it off.
transformers' DeepSeek-V3 computes none (the model balances through its router's
``e_score_correction_bias``) and neither does its Llama 4, although the Llama 4 config carries a
coefficient: both train without it, said in one line. The raw auxiliary loss of every training
forward is logged as ``aux_loss`` (mean since the last log).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: config attributes naming the number of routed experts (transformers' MoE configs)
NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                    "num_routed_experts", "n_experts")
#: config attributes naming the experts each token is routed to
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_topk",
              "moe_top_k", "moe_k")
#: config attributes naming the number of shared (always active) experts
SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
#: model attributes holding the coefficient the model multiplies its auxiliary loss with
AUX_COEF_ATTRS = ("router_aux_loss_coef", "aux_loss_coef")
#: the ``lora_target_parameters`` shorthand for every fused routed-expert weight
EXPERTS = "experts"

_AUX_STASH = "_plugtune_aux_losses"
_HOOKED = "_plugtune_aux_hook"


class MoeError(ValueError):
    """An MoE setting cannot be honoured for this model; the message names the key and why."""


@dataclass(frozen=True)
class MoeConfig:
    """The routing of an MoE config: ``num_experts`` routed experts, ``experts_per_token`` of
    them per token (top-k), ``shared_experts`` always-active ones (``None``: not in the config)."""

    num_experts: int
    experts_per_token: int
    shared_experts: int | None = None


@dataclass
class MoeBlock:
    """One MoE block of a model, by full module/parameter names.

    Attributes:
        name: the block (parent of the experts).
        experts: the expert container.
        expert_params: its fused 3-D weights ``(E, ., .)`` (empty for a ModuleList of experts).
        expert_modules: every module inside the container (its Linear layers included).
        router: the router module, or ``None`` when none was recognised.
        shared: the block's other children with parameters (shared experts, gates of them).
    """

    name: str
    experts: str
    expert_params: tuple[str, ...] = ()
    expert_modules: tuple[str, ...] = ()
    router: str | None = None
    shared: tuple[str, ...] = field(default_factory=tuple)


def _first_int(cfg, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def moe_config(cfg) -> MoeConfig | None:
    """:class:`MoeConfig` of a transformers config (its text config for multimodal models), or
    ``None`` when it names no more than one routed expert."""
    if cfg is None:
        return None
    text = _text_config(cfg)
    n = _first_int(text, NUM_EXPERTS_KEYS)
    if n is None or n < 2:
        return None
    k = _first_int(text, TOP_K_KEYS) or 1
    return MoeConfig(num_experts=n, experts_per_token=min(k, n),
                     shared_experts=_first_int(text, SHARED_KEYS))


def _unwrap(model):
    """The transformers model under a peft wrapper."""
    from transformers import PreTrainedModel

    if hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):
        return model.get_base_model()
    return model


def find_moe_blocks(model: nn.Module, cfg: MoeConfig | None = None) -> list[MoeBlock]:
    """The MoE blocks of ``model`` found structurally (see the module docstring).

    Args:
        model: a transformers model (bare or peft-wrapped; names are those of the bare model).
        cfg: its routing; default: read from ``model.config``.

    Returns:
        One :class:`MoeBlock` per expert container, in module order; ``[]`` for a dense model.
    """
    model = _unwrap(model)
    cfg = cfg or moe_config(getattr(model, "config", None))
    if cfg is None:
        return []
    e = cfg.num_experts
    mods = dict(model.named_modules())

    def router_like(mod: nn.Module) -> bool:
        w = getattr(mod, "weight", None)
        return isinstance(w, torch.Tensor) and _expert_shape(w, 2, e)

    cands: list[str] = []
    for name, mod in mods.items():
        fused = any(_expert_shape(p, 3, e) for p in mod.parameters(recurse=False))
        # a ModuleList of E expert MLPs counts only beside a router (a stack of E decoder
        # layers does not have one)
        listed = (isinstance(mod, nn.ModuleList) and len(mod) == e and "." in name
                  and len({type(m) for m in mod}) == 1
                  and any(router_like(c) for c in mods[name.rsplit(".", 1)[0]].children()))
        if name and (fused or listed):
            cands.append(name)
    # innermost containers only
    containers = [c for c in cands if not any(o.startswith(c + ".") for o in cands)]
    blocks = []
    for c in containers:
        parent = c.rsplit(".", 1)[0] if "." in c else ""
        block = mods[parent]
        expert_params = tuple(f"{c}.{pn}" for pn, p in mods[c].named_parameters(recurse=False)
                              if _expert_shape(p, 3, e))
        expert_modules = tuple(n for n in mods if n == c or n.startswith(c + "."))
        router, shared = None, []
        for child_name, child in block.named_children():
            full = f"{parent}.{child_name}" if parent else child_name
            if full == c:
                continue
            if router is None and router_like(child):
                router = full
            elif any(True for _ in child.parameters()):
                shared.append(full)
        blocks.append(MoeBlock(name=parent, experts=c, expert_params=expert_params,
                               expert_modules=expert_modules, router=router, shared=tuple(shared)))
    return blocks


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when DeepSpeed ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _expert_shape(p: torch.Tensor, ndim: int, e: int) -> bool:
    shape = _shape(p)
    return len(shape) == ndim and shape[0] == e


@functools.cache
def returns_tuple(cls: type) -> bool:
    """True when ``cls`` (an ``nn.Linear`` subclass) has its own ``forward`` that may return a
    tuple (Llama 4's ``Llama4Router`` returns ``(scores, logits)``): peft's LoRA layer adds its
    update to the base layer's output, so it cannot wrap such a module. Read from the source
    with :mod:`ast`; a model's own subclass whose source cannot be read counts as returning a
    tuple, a library's (bitsandbytes ``Linear4bit`` ...) as not."""
    if not isinstance(cls, type) or cls.forward is nn.Linear.forward:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (OSError, TypeError, SyntaxError):
        return cls.__module__.startswith(("transformers.models.", "transformers_modules"))
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(tree))


def lora_wrappable(mod: nn.Module) -> bool:
    """True when peft's LoRA can wrap ``mod``: ``nn.Linear`` (incl. bitsandbytes 4/8-bit) that
    returns a tensor (not :func:`returns_tuple`), ``nn.Embedding``, ``nn.Conv1d/2d/3d`` or
    GPT-2's ``Conv1D``."""
    if isinstance(mod, nn.Linear) and returns_tuple(type(mod)):
        return False  # peft adds its update to the output: a tuple cannot take it (Llama4Router)
    if isinstance(mod, nn.Linear | nn.Embedding | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return True
    return type(mod).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2 style)


def excluded_modules(model: nn.Module) -> set[str]:
    """Full names of the modules LoRA must not wrap in an MoE ``model``: its routers and
    everything inside its routed-expert containers (empty for a dense model)."""
    out: set[str] = set()
    for b in find_moe_blocks(model):
        out.update(b.expert_modules)
        if b.router:
            out.add(b.router)
    return out


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb and not returns_tuple(type(m))]


def lora_targets(model: nn.Module, method: str, default: list[str] | None = None,
                 exclude: tuple[str, ...] = ("lm_head",)) -> list[str] | None:
    """LoRA ``target_modules`` (full module names) for an MoE ``model``, ``None`` if dense.

    Args:
        method: ``"auto"`` (``default`` leaf names when given, e.g. peft's table, else the
            attention projections: Linear layers under a module whose class name says
            ``Attention``) or ``"all-linear"`` (every Linear but the head and ``exclude``).
        default: leaf names for ``auto`` (peft's default for the model type).

    Never returns a router, a module inside the routed experts, or a Linear subclass that
    returns a tuple (:func:`returns_tuple`). Raises :class:`MoeError` when nothing is left.
    """
    model = _unwrap(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        return None
    banned = excluded_modules(model)
    cands = [(n, m) for n, m in _linears(model)
             if n not in banned and n.rsplit(".", 1)[-1] not in exclude]
    if method == "all-linear":
        chosen = [n for n, _ in cands]
    else:
        chosen = [n for n, _ in cands if n.rsplit(".", 1)[-1] in set(default or ())]
    if method != "all-linear" and not chosen:  # auto without (usable) table entry: attention
        mods = dict(model.named_modules())

        def in_attention(name: str) -> bool:
            parts = name.split(".")
            return any("attention" in type(mods[".".join(parts[:i])]).__name__.lower()
                       for i in range(1, len(parts)))

        chosen = [n for n, _ in cands if in_attention(n)]
    if not chosen:
        raise MoeError(f"lora_target_modules: {method}: no Linear layer outside the routers and "
                       f"routed experts of this MoE model; name the modules to wrap")
    return chosen


def resolve_targets(model: nn.Module, targets: str | list[str], explicit: bool = False
                    ) -> str | list[str]:
    """For an MoE ``model``: the full names of the modules ``targets`` reach (peft's matching:
    a list by full name or ``.``-suffix, a string as a regex over full names), less routers,
    routed experts and tuple-returning layers. ``targets`` unchanged for a dense model.

    Full names keep peft's transformers-5 conversion from turning a leaf name into a routed
    expert ``ParamWrapper`` (see the module docstring).

    Args:
        explicit: the recipe listed these names (then naming a router or expert is an error;
            from ``auto``/``all-linear`` they are dropped).

    Raises:
        MoeError: an explicit list names a router/expert, or nothing wrappable is left.
    """
    base = _unwrap(model)
    if not find_moe_blocks(base):
        return targets
    banned = excluded_modules(base)
    mods = list(base.named_modules())
    if isinstance(targets, str):
        hits = [(n, m) for n, m in mods if re.fullmatch(targets, n)]
    else:
        hits = [(n, m) for n, m in mods if any(n == t or n.endswith("." + t) for t in targets)]
    bad = sorted({n.rsplit(".", 1)[-1] for n, m in hits if n in banned
                  or (isinstance(m, nn.Linear) and returns_tuple(type(m)))})
    if bad and explicit:
        raise MoeError(f"lora_target_modules {bad} reach the MoE routers or routed experts; the "
                       "router stays frozen (moe_train_router: true trains it in full) and the "
                       "experts are adapted through lora_target_parameters: experts")
    chosen = [n for n, m in hits if n not in banned and lora_wrappable(m)]
    if not chosen:
        raise MoeError(f"lora_target_modules {targets!r}: no layer LoRA can wrap outside the "
                       "routers and routed experts of this MoE model")
    return chosen


def expert_linears(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` layers of routed experts kept as a ModuleList of expert
    MLPs (older and remote-code MoE models); ``[]`` when the experts are fused."""
    model = _unwrap(model)
    mods = dict(model.named_modules())
    return [n for b in find_moe_blocks(model) if not b.expert_params
            for n in b.expert_modules if isinstance(mods[n], nn.Linear)]


def expert_parameters(model: nn.Module, asked: str | list[str]) -> list[str]:
    """Resolve ``lora_target_parameters`` to full parameter names for peft's
    ``target_parameters``.

    Args:
        asked: ``"experts"`` (every fused routed-expert weight, biases not) or parameter names
            matched as peft does: the full name or a ``.``-separated suffix
            (``experts.gate_up_proj``, ``mlp.experts.down_proj``).

    Raises:
        MoeError: nothing matches, the model has no fused expert weights (ModuleList experts
            are ``nn.Linear``: list them in ``lora_target_modules``), or peft would read a
            weight's layout wrongly (:func:`check_expert_layout`).
    """
    model = _unwrap(model)
    blocks = find_moe_blocks(model)
    fused = [p for b in blocks for p in b.expert_params]
    names = [asked] if isinstance(asked, str) else list(asked)
    if names == [EXPERTS]:
        if not fused:
            kind = "has no routed experts" if not blocks else \
                "keeps its experts as nn.Linear layers (name them in lora_target_modules)"
            raise MoeError(f"lora_target_parameters: experts: this model {kind}")
        chosen = fused
    else:
        params = [n for n, _ in model.named_parameters()]
        chosen, missing = [], []
        for t in names:
            hits = [p for p in params if p == t or p.endswith("." + t)]
            (chosen.extend(hits) if hits else missing.append(t))
        if missing:
            shown = sorted({p.split(".", 3)[-1] if p.count(".") >= 3 else p for p in fused})
            raise MoeError(f"lora_target_parameters {missing} match no parameter of the model; "
                           f"its routed-expert weights are: {', '.join(shown) or 'none'} "
                           f"(or write: experts)")
    check_expert_layout(model, chosen)
    return list(dict.fromkeys(chosen))


def check_expert_layout(model: nn.Module, params: list[str]) -> None:
    """Make sure peft reads each 3-D expert weight the right way round.

    peft's ``ParamWrapper`` takes a 3-D weight as ``(experts, out, in)`` unless the owning
    module says ``is_transposed = True`` (``(experts, in, out)``: gpt-oss). Llama 4's
    ``Llama4TextExperts`` stores ``(experts, in, out)`` without saying so; the layout is read
    from the shapes here (the input of ``gate_up_proj``/``down_proj``'s output is the hidden
    size) and the attribute set when it is missing.

    Raises:
        MoeError: the layout cannot be read from the shapes (both inner sizes equal the hidden
            size) and the module does not declare it.
    """
    hidden = getattr(_text_config(model.config), "hidden_size", None)
    mods = dict(model.named_modules())
    params_of = dict(model.named_parameters())
    for full in params:
        p = params_of.get(full)
        owner = mods.get(full.rsplit(".", 1)[0])
        if p is None or len(_shape(p)) != 3 or owner is None or hasattr(owner, "is_transposed"):
            continue
        leaf = full.rsplit(".", 1)[-1]
        a, b = _shape(p)[1:]
        reads_hidden = leaf != "down_proj"  # gate_up_proj / gate / up read the hidden states
        if hidden is None or a == b:
            raise MoeError(f"lora_target_parameters: {full} has shape {_shape(p)}; its "
                           f"layout (experts, out, in) or (experts, in, out) cannot be told "
                           f"from the shapes and {type(owner).__name__} does not declare it "
                           f"(is_transposed)")
        transposed = (a == hidden) if reads_hidden else (b == hidden)
        owner.is_transposed = transposed


def prepare_adapter_load(model: nn.Module, adapter_dir) -> None:
    """Before ``PeftModel.from_pretrained(model, adapter_dir)``: declare the layout of the expert
    weights the saved adapter adapts (``target_parameters`` of its ``adapter_config.json``), as
    training did (:func:`check_expert_layout`). A no-op for adapters without expert weights.

    Raises:
        MoeError: as :func:`check_expert_layout`.
    """
    import json
    from pathlib import Path

    cfg_file = Path(adapter_dir) / "adapter_config.json"
    if not cfg_file.is_file():
        return
    names = json.loads(cfg_file.read_text()).get("target_parameters") or []
    if names:
        params = [n for n, _ in _unwrap(model).named_parameters()]
        check_expert_layout(_unwrap(model), [p for p in params
                                             if any(p == t or p.endswith("." + t) for t in names)])


def routers(model: nn.Module) -> list[str]:
    """Full names of the router modules of ``model`` (``[]`` for a dense model)."""
    return [b.router for b in find_moe_blocks(model) if b.router]


def freeze_routers(model: nn.Module) -> int:
    """``requires_grad_(False)`` on every router of ``model``; returns the parameters frozen."""
    model = _unwrap(model)
    mods = dict(model.named_modules())
    n = 0
    for r in routers(model):
        for p in mods[r].parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
    return n


def aux_coef_attr(model: nn.Module) -> str | None:
    """The attribute the model multiplies its own auxiliary loss with (set from the config at
    ``__init__``: Mixtral, Qwen3-MoE, gpt-oss keep ``router_aux_loss_coef``), or ``None`` when
    the model computes no auxiliary loss (DeepSeek-V3, transformers' Llama 4)."""
    model = _unwrap(model)
    params = inspect.signature(type(model).forward).parameters
    if "output_router_logits" not in params:
        return None
    return next((a for a in AUX_COEF_ATTRS if a in vars(model)), None)


def configure(spec, model) -> list[str]:
    """Set up an MoE model after loading: auxiliary loss, frozen routers. Returns the notices
    (one line each) for the run to print; ``[]`` for a dense model.

    Auxiliary loss: with a coefficient > 0 (``moe_aux_loss_coef``, else the model's own) and a
    model that computes the loss (:func:`aux_coef_attr`): ``config.output_router_logits = True``
    (the label-only head of :mod:`plugtune.modeling` then steps aside, so ``out.loss`` carries
    ``coef * aux_loss``) and a forward hook records ``out.aux_loss`` of every training forward for
    the ``aux_loss`` log entry (:func:`pop_aux_loss`).

    Raises:
        MoeError: ``moe_aux_loss_coef`` > 0 for a model that computes no auxiliary loss.
    """
    recipe = spec.recipe
    base = _unwrap(model)
    cfg = moe_config(getattr(base, "config", None))
    if cfg is None:
        return []
    blocks = find_moe_blocks(base, cfg)
    notes = []
    attr = aux_coef_attr(base)
    asked = getattr(recipe, "moe_aux_loss_coef", None)
    text = _text_config(base.config)
    if attr is None:
        own = getattr(text, "router_aux_loss_coef", None)
        if asked:
            raise MoeError(f"moe_aux_loss_coef: {asked}: {type(base).__name__} computes no router "
                           f"auxiliary loss (transformers' forward has none); remove the key")
        why = (f" (its config sets router_aux_loss_coef={own}, which that forward never uses)"
               if own else "")
        notes.append(f"MoE: no router auxiliary loss: transformers' {type(base).__name__} "
                     f"computes none{why}")
    else:
        coef = float(asked if asked is not None else getattr(base, attr) or 0.0)
        on = coef > 0
        for c in {id(base.config): base.config, id(text): text}.values():
            c.output_router_logits = on
            if hasattr(c, attr):
                setattr(c, attr, coef)
        setattr(base, attr, coef)
        if on:
            _hook_aux_loss(base)
            src = " (moe_aux_loss_coef)" if asked is not None else ""
            notes.append(f"MoE: router auxiliary loss on, coefficient {coef:g}{src}; "
                         "logged as aux_loss")
        else:
            notes.append("MoE: router auxiliary loss off (coefficient 0)")
    if getattr(recipe, "moe_train_router", False):
        notes.append(f"MoE: {len([b for b in blocks if b.router])} routers train "
                     "(moe_train_router: true)")
    else:
        frozen = freeze_routers(base)
        notes.append(f"MoE: {len([b for b in blocks if b.router])} routers frozen ({frozen:,} "
                     "parameters; moe_train_router: true trains them)")
    return notes


def _hook_aux_loss(base: nn.Module) -> None:
    if getattr(base, _HOOKED, False):
        return
    stash: list[float] = []
    setattr(base, _AUX_STASH, stash)

    def record(module, args, output) -> None:
        aux = getattr(output, "aux_loss", None)
        if module.training and torch.is_grad_enabled() and isinstance(aux, torch.Tensor):
            stash.append(float(aux.detach().float()))

    base.register_forward_hook(record)
    setattr(base, _HOOKED, True)


def pop_aux_loss(model: nn.Module) -> float | None:
    """Mean auxiliary loss of the training forwards since the last call (``None``: none)."""
    stash = getattr(_unwrap(model), _AUX_STASH, None)
    if not stash:
        return None
    mean = sum(stash) / len(stash)
    stash.clear()
    return mean


def lora_extras(spec, model: nn.Module) -> dict[str, Any]:
    """Extra ``peft.LoraConfig`` arguments for an MoE model: ``target_parameters`` from
    ``lora_target_parameters`` (for experts kept as ``nn.Linear`` layers in a ModuleList:
    ``expert_modules``, their full names, to add to ``target_modules``) and, with
    ``moe_train_router: true``, the routers in ``modules_to_save`` (trained in full next to the
    adapter). ``{}`` when neither applies.

    Raises:
        MoeError: as :func:`expert_parameters`; ``lora_dropout`` > 0 with expert parameters.
    """
    recipe = spec.recipe
    out: dict[str, Any] = {}
    asked = getattr(recipe, "lora_target_parameters", None)
    if asked:
        if recipe.lora_dropout:
            raise MoeError(f"lora_target_parameters needs lora_dropout: 0 (got "
                           f"{recipe.lora_dropout}): peft's ParamWrapper cannot apply dropout "
                           "to an expert weight's input")
        listed = expert_linears(model) if asked in (EXPERTS, [EXPERTS]) else []
        if listed:  # experts kept as nn.Linear (ModuleList): LoRA wraps those layers
            out["expert_modules"] = listed
        else:
            out["target_parameters"] = expert_parameters(model, asked)
    if getattr(recipe, "moe_train_router", False):
        found = routers(model)
        if found:
            out["modules_to_save"] = found
    return out


def parameter_counts(model: nn.Module) -> dict[str, Any] | None:
    """Total and active-per-token parameters of an MoE ``model`` (``None`` if dense).

    Active = total - routed-expert parameters x (1 - k/E): a token passes through ``k`` of the
    ``E`` routed experts of each block; attention, embeddings, routers and shared experts are
    used by every token. Works on the meta device.

    Returns:
        ``{"num_experts", "experts_per_token", "shared_experts", "moe_blocks", "total_params",
        "routed_expert_params", "active_params"}``.
    """
    model = _unwrap(model)
    cfg = moe_config(getattr(model, "config", None))
    blocks = find_moe_blocks(model, cfg) if cfg else []
    if not blocks:
        return None
    mods = dict(model.named_modules())
    routed = sum(p.numel() for b in blocks for p in mods[b.experts].parameters())
    total = sum(p.numel() for p in model.parameters())
    shared = cfg.shared_experts
    if shared is None:  # shared expert MLPs (a bare Linear beside them is a gate: Qwen2-MoE)
        shared = max((sum(not isinstance(mods[c], nn.Linear) for c in b.shared) for b in blocks),
                     default=0)
    active = total - routed + routed * cfg.experts_per_token // cfg.num_experts
    return {"num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token,
            "shared_experts": shared, "moe_blocks": len(blocks), "total_params": total,
            "routed_expert_params": routed, "active_params": active}
