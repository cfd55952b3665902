"""Per-architecture facts read from a model's config (and its class): the automatic route,
whether packing is exact, and the attention implementation the model supports.

Everything here reads ``transformers``' own tables rather than lists of names kept by hand:

* **Route** (:func:`generic_route`): a ``model_type`` no family plugin claims goes to core's
  generic causal-LM family when ``transformers`` maps its config to a causal-LM class
  (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), to the pseudo model type ``image_text`` (claimed by
  ``plugtune-vision``) when it maps it to an image-text-to-text class
  (``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``; composites such as ``gemma3`` and ``qwen3_5``
  are in both tables and take the image-text route), and is refused otherwise with the reason:
  encoder-only (bidirectional, e.g. ``bert``), encoder-decoder without a family plugin, no
  generative class, or a config ``transformers`` cannot read.
* **Packing** (:func:`packing_support`): plugtune packs samples into rows whose ``position_ids``
  restart at 0 per sample; transformers turns the restarts into a block-diagonal mask
  (``masking_utils.find_packed_sequence_indices``) for *softmax* attention only. Recurrent,
  linear-attention (gated delta rule), short-convolution and state-space layers carry state from
  one packed sample into the next (a tiny ``qwen3_5_text`` differs by |Δlogit| ~5e-2, see
  ../shared/FINDINGS.md), so packing is refused for them, naming the layer kind.
* **Attention** (:func:`supported_attention`): plugtune asks for ``sdpa``; a model class with
  ``_supports_sdpa = False`` (``gpt_oss``) gets ``eager``. The packed-sequence mask above is
  built for every mask interface (``sdpa``, ``eager``, ``flex``), but only when the model hands
  ``position_ids`` to the mask builders (:func:`mask_sees_position_ids`); ``gpt_oss`` does not,
  so :func:`install_packed_masks` builds its masks with them.

This module imports ``transformers`` only inside functions.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Any

#: ``layer_types`` / ``layers_block_type`` values whose layers see only the current sample when
#: the packed-sequence mask is applied (softmax attention), or hold no sequence state at all
SOFTMAX_LAYER_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention",
                                 "attention", "global", "local", "mlp", "moe", "dense"})

#: config attributes that only state-space / recurrent / linear-attention models define, and the
#: layer kind each one reveals (used when a config lists no layer kinds)
_RECURRENT_ATTRS = (("ssm_state_size", "state space (Mamba)"),
                    ("mamba_d_state", "state space (Mamba)"),
                    ("linear_num_value_heads", "linear attention (gated delta rule)"),
                    ("attention_hidden_size", "recurrent (RWKV)"),
                    ("conv_L_cache", "short convolution"))

#: the config fields that list one kind per layer, in the order they are consulted
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")

#: what a refused layer kind is called in messages
_KIND_NAMES = {"linear_attention": "linear attention / state space", "conv": "short convolution",
               "hybrid": "hybrid attention + state space (Mamba)", "mamba": "state space (Mamba)",
               "recurrent": "recurrent"}

#: the pseudo model type of the generic image-text route (claimed by plugtune-vision)
IMAGE_TEXT = "image_text"
#: the pseudo model type of core's generic causal-LM family
CAUSAL_LM = "causal_lm"

#: model types the contract test (``packages/core/tests/test_architectures.py``) builds and
#: checks end to end through the generic route: start without ``model_type``, LoRA + packing,
#: packed == unpacked logits (or refused), label-only loss, merge, generation stop
CONTRACT_TYPES = ("qwen3", "qwen3_moe", "qwen3_5_text", "gemma3_text", "gemma4_text",
                  "llama4_text", "gpt_oss", "phi3", "smollm3", "olmo3", "granite", "mixtral",
                  "ministral3", "glm4", "lfm2", "deepseek_v3")
CONTRACT_TEST = "packages/core/tests/test_architectures.py::test_contract"


class ArchitectureError(ValueError):
    """A model cannot be trained by any route; the message says why and what to do."""


@dataclass(frozen=True)
class GenericRoute:
    """Where a model no family plugin claims goes.

    Attributes:
        model_type: the pseudo model type to route (``"causal_lm"`` or ``"image_text"``).
        auto_class: the ``transformers`` auto class that loads it.
        architecture: the concrete class ``transformers`` maps the config to.
    """

    model_type: str
    auto_class: str
    architecture: str


@dataclass(frozen=True)
class Packing:
    """Whether packed rows give each sample the logits it has alone.

    Attributes:
        exact: ``True`` when packing is exact.
        reason: why (the layer kind that leaks state across samples when refused).
        source: ``"family"`` (a plugin's :attr:`plugtune.spec.Family.packing`) or ``"config"``.
    """

    exact: bool
    reason: str
    source: str = "config"


def _mappings() -> dict[str, Any]:
    from transformers.models.auto import modeling_auto as ma

    return {"causal": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            "image_text": ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
            "seq2seq": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            "masked": ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES}


def _auto_map_class(config: Any, auto: str) -> str | None:
    auto_map = getattr(config, "auto_map", None) or {}
    ref = auto_map.get(auto) if isinstance(auto_map, dict) else None
    return ref.rsplit(".", 1)[-1] if isinstance(ref, str) else None


def generic_route(model_type: str, config: Any) -> GenericRoute:
    """The generic route of a model no family plugin claims, decided from its config.

    Args:
        model_type: ``config.json``'s ``model_type``.
        config: the ``transformers`` config (``None`` when transformers cannot build it).

    Returns:
        ``causal_lm`` (``AutoModelForCausalLM``) or ``image_text``
        (``AutoModelForImageTextToText``, served by plugtune-vision).

    Raises:
        ArchitectureError: transformers cannot read the config; the model is encoder-only
            (bidirectional attention, e.g. ``bert``), encoder-decoder, or has no generative class.
    """
    if config is None:
        import transformers

        raise ArchitectureError(
            f"model_type {model_type!r} is not known to transformers {transformers.__version__} "
            f"and no installed plugtune plugin claims it: upgrade transformers, set "
            f"trust_remote_code: true if the folder ships its code (auto_map), or install the "
            f"family's plugtune plugin")
    maps = _mappings()
    mt = getattr(config, "model_type", None) or model_type
    remote_it = _auto_map_class(config, "AutoModelForImageTextToText") or _auto_map_class(
        config, "AutoModelForVision2Seq")
    if mt in maps["image_text"] or remote_it:
        return GenericRoute(IMAGE_TEXT, "AutoModelForImageTextToText",
                            remote_it or maps["image_text"][mt])
    if getattr(config, "is_encoder_decoder", False) or mt in maps["seq2seq"]:
        raise ArchitectureError(
            f"model_type {mt!r} is an encoder-decoder model and no installed plugtune plugin "
            f"claims it: plugtune's generic route serves decoder-only causal LMs and image-text "
            f"models; install the family's plugin (plugtune-t5 serves t5 / mt5 / umt5 / flan-t5)")
    remote_lm = _auto_map_class(config, "AutoModelForCausalLM")
    if mt in maps["causal"] or remote_lm:
        if mt in maps["masked"] and not getattr(config, "is_decoder", False):
            raise ArchitectureError(
                f"model_type {mt!r} is an encoder-only model (bidirectional attention, trained "
                f"by masked-token prediction): it cannot be fine-tuned as a causal LM; choose a "
                f"decoder-only model")
        return GenericRoute(CAUSAL_LM, "AutoModelForCausalLM", remote_lm or maps["causal"][mt])
    archs = getattr(config, "architectures", None) or []
    raise ArchitectureError(
        f"model_type {mt!r} has no causal-LM or image-text-to-text class in transformers "
        f"(architectures in config.json: {', '.join(archs) or 'none'}): plugtune trains "
        f"generative text and image-text models only")


def route_line(model_type: str, route: GenericRoute, plugin: str) -> str:
    """The one line printed when a model takes the generic route."""
    what = "generic causal-LM route" if route.model_type == CAUSAL_LM else "generic image-text route"
    return (f"{model_type}: no family plugin claims it; {what} ({route.auto_class}, "
            f"{route.architecture}, plugin {plugin})")


def _text_config(config: Any) -> Any:
    """``config.get_text_config()`` (the decoder's config of composite models), or ``config``
    where there is none or it is ambiguous (several text configs)."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:
        return config


def layer_kinds(config: Any) -> list[str]:
    """The kind of every layer of ``config`` (``[]`` when the config does not list them).

    Reads ``layer_types`` (Qwen3.5, Gemma 3, LFM2 ...), ``layers_block_type`` (Jamba, Bamba,
    Falcon-H1, Zamba) or ``block_types``; for composite configs the text config's
    (``config.get_text_config()``).
    """
    text = _text_config(config)
    for cfg in (text, config):
        for name in _LAYER_KIND_FIELDS:
            kinds = getattr(cfg, name, None)
            if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
                return list(kinds)
    return []


def packing_support(config: Any, family: Any = None) -> Packing:
    """Whether packed rows (position ids restarting per sample) are exact for this model.

    Args:
        config: the ``transformers`` config (``None``: unknown, refused).
        family: the routed :class:`plugtune.spec.Family`; its ``packing`` (``"exact"`` /
            ``"refused"`` + ``packing_reason``) overrides; ``"auto"`` decides from the config.

    Returns:
        :class:`Packing`. Exact for softmax attention (full, sliding, chunked) with any MLP/MoE
        whose forward hands ``position_ids`` to transformers' mask builders, or takes masks
        prepared by :func:`install_packed_masks` (which ``plugtune.modeling.load_model`` installs
        for packed runs); refused, naming the layer kind, when a layer is linear attention,
        recurrent, convolutional or state-space, when the masks cannot see the samples, or
        when the config cannot be read.

    The verdicts are checked by comparing packed with per-sample logits in
    ``packages/core/tests/test_architectures.py`` (:func:`plugtune.testing.architectures.packed_logit_gap`).
    """
    if family is not None and getattr(family, "packing", "auto") == "exact":
        return Packing(True, f"family {family.name} vouches for packed rows", "family")
    if family is not None and getattr(family, "packing", "auto") == "refused":
        return Packing(False, family.packing_reason or f"family {family.name} refuses packing",
                       "family")
    if config is None:
        return Packing(False, "transformers cannot read this config, so plugtune cannot tell "
                       "whether packed samples stay separate")
    kinds = layer_kinds(config)
    if kinds:
        other = sorted({k for k in kinds if k not in SOFTMAX_LAYER_KINDS})
        if other:
            named = ", ".join(f"{k!r} ({_KIND_NAMES.get(k, 'not softmax attention')}, "
                              f"{kinds.count(k)} of {len(kinds)} layers)" for k in other)
            return Packing(False, f"layer kinds {named} carry state from one packed sample into "
                           f"the next; position-id restarts separate samples only in softmax "
                           f"attention")
    else:
        recurrent = _recurrent_attr(config)
        if recurrent:
            return Packing(False, f"{recurrent[1]} layers (config.{recurrent[0]}) carry state "
                           f"from one packed sample into the next; position-id restarts "
                           f"separate samples only in softmax attention")
    sees = mask_sees_position_ids(config)
    if sees is False and takes_prepared_masks(config):
        return Packing(True, f"{_base_class_name(config)}.forward builds its attention masks "
                       f"without position_ids; plugtune builds them with position_ids "
                       f"(transformers' own builders, install_packed_masks), so each packed "
                       f"sample gets its own causal mask")
    if sees is False:
        return Packing(False, f"{_base_class_name(config)}.forward builds its attention masks "
                       f"without position_ids, so transformers cannot find the packed samples "
                       f"and each attends to the samples packed before it")
    kinds_txt = f" ({', '.join(sorted(set(kinds)))})" if kinds else ""
    return Packing(True, f"softmax attention{kinds_txt}: position-id restarts give each packed "
                   f"sample its own causal mask")


_MASK_BUILDER = re.compile(r"create_\w*mask\w*")


def _base_class(config: Any) -> type | None:
    """The bare model class (``AutoModel``) of the text part of ``config``, or ``None``."""
    from transformers import AutoModel

    text = _text_config(config)
    for cfg in (text, config):
        try:
            return AutoModel._model_mapping[type(cfg)]
        except (KeyError, AttributeError, ValueError):
            continue
    return None


def _base_class_name(config: Any) -> str:
    cls = _base_class(config)
    return cls.__name__ if cls is not None else type(config).__name__


#: the transformers mask builder of each softmax layer kind (``masking_utils``)
_MASK_BUILDERS = {"full_attention": "create_causal_mask",
                  "sliding_attention": "create_sliding_window_causal_mask",
                  "chunked_attention": "create_chunked_causal_mask"}


def takes_prepared_masks(config: Any) -> bool:
    """Whether the bare model's ``forward`` accepts ``attention_mask`` as a ready mapping
    ``{layer kind: mask}`` (``isinstance(causal_mask_mapping := attention_mask, dict)``, as
    ``generate`` passes it) and every layer kind has a transformers mask builder, so
    :func:`install_packed_masks` can hand it masks built with ``position_ids``."""
    cls = _base_class(config)
    kinds = set(layer_kinds(config))
    if cls is None or not kinds or not kinds <= set(_MASK_BUILDERS):
        return False
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "isinstance(causal_mask_mapping := attention_mask, dict)" in src


def install_packed_masks(model: Any) -> bool:
    """Make packed rows exact for a model whose forward builds its masks without
    ``position_ids`` (:func:`mask_sees_position_ids` ``False``, e.g. ``gpt_oss``).

    A forward pre-hook on the bare model: when a call has ``position_ids`` that restart inside
    a row (packed samples), no ``attention_mask`` and no cache (training; ``generate`` always
    passes a mask), it builds ``{layer kind: mask}`` with transformers' own builders
    (``create_causal_mask``, ``create_sliding_window_causal_mask`` ...) *with* the
    ``position_ids``, which is what the model would have built had it passed them. Installed
    once; returns ``True`` when installed (``False``: not needed or not possible).
    """
    config = getattr(model, "config", None)
    if config is None or mask_sees_position_ids(config) is not False or \
            not takes_prepared_masks(config):
        return False
    base = getattr(model, "base_model", model)
    if getattr(base, "_plugtune_packed_masks", False):
        return True
    import torch
    from transformers import masking_utils

    kinds = sorted(set(layer_kinds(config)))

    def build(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if (pos is None or kwargs.get("attention_mask") is not None or args
                or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                or masking_utils.find_packed_sequence_indices(pos) is None):
            return None
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ids = kwargs["input_ids"]
            ref = torch.empty(*ids.shape, 0, dtype=module.get_input_embeddings().weight.dtype,
                              device=ids.device)  # the builders read batch, dtype, device only
        kwargs["attention_mask"] = {
            k: getattr(masking_utils, _MASK_BUILDERS[k])(
                config=module.config, inputs_embeds=ref, attention_mask=None, cache=None,
                position_ids=pos) for k in kinds}
        return args, kwargs

    base.register_forward_pre_hook(build, with_kwargs=True)
    base._plugtune_packed_masks = True
    return True


def mask_sees_position_ids(config: Any) -> bool | None:
    """Whether the bare model's ``forward`` hands ``position_ids`` to every transformers mask
    builder it calls (``create_causal_mask``, ``create_sliding_window_causal_mask`` ...), read
    from its source (AST): only then does ``masking_utils.find_packed_sequence_indices`` see
    the packed samples. ``None`` when the class or its source is unknown (remote code).

    ``gpt_oss`` (transformers 5) calls them without ``position_ids``: a sample packed after
    another differs from the sample alone by |Δlogit| ~0.5 on a tiny model.
    """
    cls = _base_class(config)
    if cls is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    dicts: dict[str, set] = {}  # name -> keys of the dict literal (or of the dict it copies)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        v = node.value
        if isinstance(v, ast.Dict):
            dicts[node.targets[0].id] = {k.value for k in v.keys if isinstance(k, ast.Constant)}
        elif (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "copy"
              and isinstance(v.func.value, ast.Name)):  # sliding_kwargs = mask_kwargs.copy()
            dicts[node.targets[0].id] = set(dicts.get(v.func.value.id, ()))
    aliases = set()  # mask_function = create_causal_mask if ... else create_sliding_window_...
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and any(isinstance(n, ast.Name) and _MASK_BUILDER.fullmatch(n.id)
                        for n in ast.walk(node.value))
                and not isinstance(node.value, (ast.Call, ast.Dict))):
            aliases.add(node.targets[0].id)
    calls = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if not (_MASK_BUILDER.fullmatch(name) or name in aliases) or "bidirectional" in name:
            continue
        calls += 1
        if not any(kw.arg == "position_ids" or (kw.arg is None and isinstance(kw.value, ast.Name)
                                                and "position_ids" in dicts.get(kw.value.id, ()))
                   for kw in node.keywords):
            return False
    return True if calls else None


def _recurrent_attr(config: Any) -> tuple[str, str] | None:
    """``(attribute, layer kind)`` of the first :data:`_RECURRENT_ATTRS` entry ``config``
    defines (its class can build such layers), else ``None``."""
    if config is None:
        return None
    text = _text_config(config)
    return next(((a, k) for a, k in _RECURRENT_ATTRS if getattr(text, a, None) is not None), None)


def model_class(config: Any, auto_class: Any = None) -> type | None:
    """The class ``auto_class`` (default ``AutoModelForCausalLM``) builds for ``config``, or
    ``None`` (unknown config, remote code)."""
    if config is None:
        return None
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    try:
        return auto_class._model_mapping[type(config)]
    except (KeyError, AttributeError, ValueError):
        return None


def supported_attention(config: Any, requested: str, auto_class: Any = None) -> tuple[str, str]:
    """``(implementation, notice)``: ``requested`` when the model class supports it, else the
    implementation it does support (``eager``), with a one-line notice (``""`` when unchanged).

    Only ``sdpa`` and ``flash_attention_2`` are checked (``_supports_sdpa`` /
    ``_supports_flash_attn``); other values pass unchanged.
    """
    cls = model_class(config, auto_class)
    if cls is None:
        return requested, ""
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(requested)
    if flag is None or getattr(cls, flag, True):
        return requested, ""
    fallback = "sdpa" if requested == "flash_attention_2" and getattr(cls, "_supports_sdpa", False) \
        else "eager"
    mt = getattr(config, "model_type", "?")
    return fallback, (f"{mt}: {cls.__name__} does not support {requested} attention; using "
                      f"{fallback} (packing is judged separately: packing_support)")


def family_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """What ``plugtune families`` lists: one dict per model type claimed by an installed plugin,
    plus the :data:`CONTRACT_TYPES` no plugin claims (served by the generic route).

    ``table``: :func:`plugtune.plugins.routing_table` (``model_type -> Route``).

    Keys: ``model_type``, ``route`` (``"<plugin> (family <name>)"`` or ``"generic: ..."``),
    ``quirks`` (list), ``packing`` (``"exact"`` / ``"refused"`` / ``"unknown"``),
    ``packing_reason``, ``attn_implementation``, ``test`` (test ids, ``"; "``-joined).
    The packing and attention columns are read from ``transformers``' default config of each
    type (:func:`packing_support`, :func:`supported_attention`); a checkpoint whose config
    differs (e.g. a layer mix) is judged again from its own config when it trains.
    """
    from transformers import AutoConfig

    generic = table.get(CAUSAL_LM)
    rows: list[dict[str, Any]] = []
    types = [mt for mt in table if mt not in (CAUSAL_LM, IMAGE_TEXT)]
    types += [mt for mt in CONTRACT_TYPES if mt not in table]
    for mt in sorted(types):
        route = table.get(mt)
        fam = route.family if route is not None else (generic.family if generic else None)
        try:
            cfg = AutoConfig.for_model(mt)
        except (ValueError, KeyError):
            cfg = None
        if cfg is None and (fam is None or fam.packing == "auto"):
            packing, reason = "unknown", "transformers has no config class for this type"
        else:
            verdict = packing_support(cfg, fam)
            packing, reason = ("exact" if verdict.exact else "refused"), verdict.reason
            recurrent = _recurrent_attr(cfg) if verdict.exact and verdict.source == "config" \
                else None
            if recurrent:  # LFM2: the default config is all attention, checkpoints are not
                packing = "per checkpoint"
                reason = (f"exact when the checkpoint's config.layer_types lists only softmax "
                          f"attention; refused when it lists {recurrent[1]} layers "
                          f"(config.{recurrent[0]}), as released checkpoints do")
        attn = (fam.attn_implementation if fam is not None and fam.attn_implementation
                else supported_attention(cfg, "sdpa")[0])
        tests = list(fam.tests) if route is not None and fam is not None else []
        if route is None and mt in CONTRACT_TYPES:
            tests.append(f"{CONTRACT_TEST}[{mt}]")
        if route is not None:
            where = f"{route.plugin} (family {route.family.name})"
        else:
            try:
                g = generic_route(mt, cfg)
                where = f"generic {g.model_type} ({g.auto_class})"
            except ArchitectureError as exc:
                where = f"refused: {exc}"
        rows.append({"model_type": mt, "route": where,
                     "quirks": list(fam.quirks) if route is not None and fam else [],
                     "packing": packing, "packing_reason": reason,
                     "attn_implementation": attn, "test": "; ".join(tests)})
    return rows
