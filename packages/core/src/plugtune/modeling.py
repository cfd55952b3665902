"""Model-side helpers shared by the default plugin and family plugins (public API for plugins).

Plugins compose these with their family's quirks instead of re-implementing loading,
quantization, target discovery or generation.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugtune.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says which path and why."""


def attn_implementation(spec: ModelSpec, auto_class=None) -> str | None:
    """The attention implementation to load ``spec`` with.

    In order: the recipe's ``attn_implementation`` (other than ``flash_attention_2``) as is;
    ``flash_attention_2`` when asked for (``flash_attention: true``) and usable (CUDA +
    flash_attn installed), else a one-line notice; the family's
    :attr:`plugtune.spec.Family.attn_implementation`; ``sdpa``. The choice is then checked
    against what the model class supports (``_supports_sdpa`` / ``_supports_flash_attn`` of the
    class ``auto_class`` builds from ``spec.hf_config``, see
    :func:`plugtune.architectures.supported_attention`): gpt-oss has no ``sdpa`` and gets
    ``eager``, with one notice.
    """
    from plugtune.architectures import supported_attention

    rec = spec.recipe
    if rec.attn_implementation and rec.attn_implementation != "flash_attention_2":
        return rec.attn_implementation
    wanted = spec.family.attn_implementation or "sdpa"
    if rec.flash_attention or rec.attn_implementation == "flash_attention_2":
        import importlib.util

        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            wanted = "flash_attention_2"
        else:
            why = "no CUDA device" if not torch.cuda.is_available() else "flash-attn is not installed"
            log.warning("flash_attention_2 asked for but %s; using %s "
                        "(pip install 'plugtune[flash-attn]')", why, wanted)
    impl, notice = supported_attention(spec.hf_config, wanted, auto_class)
    if notice:
        log.warning("%s", notice)
    elif spec.family.attn_implementation and impl == spec.family.attn_implementation:
        log.info("%s: %s attention (family %s, plugin %s)", spec.model_type, impl,
                 spec.family.name, spec.plugin)
    return impl


def quantization_config(spec: ModelSpec):
    """A ``BitsAndBytesConfig`` for ``spec.quantization`` or ``None``.

    4-bit is NF4 with double quantization and bf16 compute (QLoRA, Dettmers et al. 2023,
    arXiv:2305.14314). Raises :class:`ModelLoadError` when bitsandbytes is missing.
    """
    if spec.quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelLoadError(
            f"adapter {spec.recipe.adapter!r} / load_in_{spec.quantization} needs bitsandbytes: "
            "pip install 'plugtune[quant]'") from exc
    if spec.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(spec: ModelSpec, padding_side: str = "right", **kwargs: Any):
    """``AutoTokenizer`` for the recipe's ``tokenizer`` (or ``base_model``), with a pad token.

    A tokenizer without a pad token gets ``pad = unk`` when it has one, else ``pad = eos``.
    With plugtune's collator this never stops EOS from being learned: labels are padded with
    -100 from the features, not derived from ``input_ids == pad``.
    """
    from transformers import AutoTokenizer

    src = spec.recipe.tokenizer or spec.path
    try:
        tok = AutoTokenizer.from_pretrained(
            src, trust_remote_code=spec.trust_remote_code, revision=spec.recipe.revision, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {src!r}: {exc}") from exc
    apply_special_tokens(tok, spec.recipe.special_tokens)
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def apply_special_tokens(tok, special: dict[str, Any]) -> list[str]:
    """Set the recipe's ``special_tokens`` (axolotl's key: ``pad_token``, ``bos_token``,
    ``eos_token``, ``unk_token``, ``additional_special_tokens``) on a tokenizer.

    Tokens not yet in the vocabulary are added (``tokenizer.add_special_tokens``); the caller
    resizes the model's embeddings when ``len(tokenizer)`` outgrows them (``train`` does).

    Returns:
        the tokens that were new to the vocabulary.
    """
    if not special:
        return []
    vocab = tok.get_vocab()
    new = [t for v in special.values() for t in ([v] if isinstance(v, str) else v) if t not in vocab]
    tok.add_special_tokens(dict(special))
    return new


def new_tokens(model, tok, added: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``added`` plus every token whose id is beyond the model's input embeddings (tokens the
    recipe's ``special_tokens`` added at load time): the rows to resize for and to train."""
    n_rows = model.get_input_embeddings().weight.shape[0]
    beyond = tok.convert_ids_to_tokens(list(range(n_rows, len(tok))))
    return list(dict.fromkeys([*added, *beyond]))


def ensure_pad_token(tok) -> None:
    """Give a tokenizer without a pad token one: ``unk`` if it has one, else ``eos``.

    Safe for EOS learning with plugtune's collator: labels are padded with -100 from the
    features, never derived from ``input_ids == pad_token_id``.
    """
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token


class _OncePerMessage(logging.Filter):
    """A logging filter that passes each distinct message template once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def log_once(logger_name: str) -> None:
    """Let each distinct message of logger ``logger_name`` through once (idempotent)."""
    lg = logging.getLogger(logger_name)
    if not any(isinstance(f, _OncePerMessage) for f in lg.filters):
        lg.addFilter(_OncePerMessage())


def load_model(spec: ModelSpec, auto_class=None, **kwargs: Any):
    """Load ``spec.path`` with the dtype policy, attention implementation and quantization.

    Safetensors only unless the folder has no ``*.safetensors`` (then a warning: pickles can
    run code). ``trust_remote_code`` comes from the recipe (off by default).
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    qc = quantization_config(spec)
    p = Path(spec.path)
    use_safetensors = True
    if p.is_dir() and not any(p.glob("*.safetensors")):
        if not spec.recipe.trust_remote_code:
            raise ModelLoadError(
                f"{spec.path} has no *.safetensors weights; plugtune does not load pickled "
                "weights (they can run code). Convert the checkpoint to safetensors, or set "
                "trust_remote_code: true if you trust this folder.")
        use_safetensors = None
    args: dict[str, Any] = dict(
        dtype=spec.torch_dtype,
        trust_remote_code=spec.trust_remote_code,
        revision=spec.recipe.revision,
        use_safetensors=use_safetensors,
    )
    # a plugin that passes attn_implementation (BLOOM: eager) decides; else the policy above
    impl = kwargs.get("attn_implementation") or attn_implementation(spec, auto_class)
    if impl:
        args["attn_implementation"] = impl
    if qc is not None:
        args["quantization_config"] = qc
        if spec.quantization == "8bit":
            # bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every
            # 8-bit matmul (hundreds per step); show it once.
            log_once("bitsandbytes.autograd._functions")
        args["dtype"] = torch.bfloat16 if spec.quantization == "4bit" else spec.torch_dtype
    args.update(kwargs)
    try:
        model = auto_class.from_pretrained(spec.path, **args)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {spec.path!r} with {auto_class.__name__}: {exc}") from exc
    if spec.recipe.sample_packing or spec.recipe.eval_sample_packing:
        from plugtune.architectures import install_packed_masks

        if install_packed_masks(model):  # gpt_oss: its forward drops position_ids for masks
            log.info("packed rows: %s attention masks built with position_ids",
                     type(model).__name__)
    if (args.get("attn_implementation") == "sdpa" and spec.recipe.sample_packing
            and spec.task == "causal" and not torch.cuda.is_available()):
        # packed rows on CPU: sdpa per packed sample, not over the whole masked row
        # (plugtune.attention; falls back to plain sdpa whenever the split is not exact)
        from plugtune import attention

        if attention.enable(model):
            log.debug("packed rows use %s attention (per-sample sdpa on CPU)", attention.NAME)
    return model


def linear_module_names(model: nn.Module, exclude: Iterable[str] = ("lm_head",),
                        within: str | None = None) -> list[str]:
    """Distinct leaf names of every ``nn.Linear`` (incl. bitsandbytes 4/8-bit) in ``model``.

    Never names a Linear subclass whose ``forward`` returns a tuple (Llama 4's router: peft
    cannot wrap it) nor the routers and routed experts of an MoE model (:mod:`plugtune.moe`;
    a leaf name that also names other layers, such as DeepSeek-V3's shared experts'
    ``gate_proj``, stays: ``lora_config`` resolves the names to exact modules).

    Args:
        exclude: leaf names to skip (the output head; embeddings are not Linear).
        within: only modules whose full name matches this regex (e.g. the language model of a
            vision-language model).
    """
    from plugtune import moe

    names: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    banned = moe.excluded_modules(model)
    for full, mod in model.named_modules():
        if (not isinstance(mod, nn.Linear) or mod is out_emb or full in banned
                or moe.returns_tuple(type(mod))):
            continue
        if within and not re.search(within, full):
            continue
        leaf = full.rsplit(".", 1)[-1]
        if leaf not in exclude:
            names.add(leaf)
    return sorted(names)


def check_target_modules(model: nn.Module, targets: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the targets not in ``model`` and the Linear names it has.

    A target must name at least one module LoRA can wrap (``nn.Linear`` incl. bitsandbytes
    4/8-bit, ``nn.Embedding``, ``nn.Conv1d/2d/3d``, GPT-2's ``Conv1D``): a name that only
    matches a container (BLOOM's ``mlp`` is a ``BloomMLP`` holding ``dense_h_to_4h`` and
    ``dense_4h_to_h``) is reported too, instead of failing later inside peft.
    """
    named = list(model.named_modules())
    missing, containers = [], []
    for t in targets:
        hits = [m for n, m in named if n == t or n.endswith("." + t)]
        if not hits:
            missing.append(t)
        elif not any(_lora_wrappable(m) for m in hits):
            containers.append(f"{t} ({type(hits[0]).__name__})")
    if missing or containers:
        parts = []
        if missing:
            parts.append(f"lora_target_modules {missing} not found in the model")
        if containers:
            parts.append(f"lora_target_modules {containers} are not layers LoRA can wrap "
                         "(not nn.Linear/Embedding/Conv, or a layer that returns a tuple)")
        raise ValueError(
            f"{'; '.join(parts)}; its Linear modules are: "
            f"{', '.join(linear_module_names(model, exclude=()))}")


def _lora_wrappable(mod: nn.Module) -> bool:
    from plugtune.moe import lora_wrappable

    return lora_wrappable(mod)


def peft_default_targets(model_type: str) -> list[str] | None:
    """peft's default LoRA targets for ``model_type`` (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

    found = M.get(model_type)
    return list(found) if found else None


def prompt_texts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[str]:
    """Render user prompts (or message lists) with the chat template + generation prompt."""
    out = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append("\n\n".join(m["content"] for m in msgs))
    return out


def stop_token_ids(tokenizer, model=None, extra: Sequence[str | int] = ()) -> list[int]:
    """EOS plus the chat template's end-of-turn token (e.g. ``<|im_end|>``, ``<|eot_id|>``),
    the model's ``generation_config.eos_token_id`` and ``extra`` (token strings or ids; strings
    not in the vocabulary are skipped, so a family plugin can list all its variants)."""
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        from plugtune.data.tokenize import TemplateRenderError, probe_template

        try:
            ids = list(probe_template(tokenizer).stop_token_ids)
        except TemplateRenderError:
            ids = []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    more = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    vocab = tokenizer.get_vocab() if extra else {}
    for e in extra:
        tid = vocab.get(e) if isinstance(e, str) else e
        if tid is not None:
            more.append(tid)
    for e in more:
        if e not in ids:
            ids.append(e)
    return ids


@torch.no_grad()
def generate_causal(model, tokenizer, prompts: Sequence[str | list[dict]], max_new_tokens: int,
                    do_sample: bool = False, batch_size: int = 8,
                    extra_stop_tokens: Sequence[str | int] = (), skip_special_tokens: bool = True,
                    postprocess: Callable[[str], str] | None = None,
                    **gen_kwargs: Any) -> list[str]:
    """Batched generation for decoder-only models: left padding, stop on EOS/end-of-turn.

    ``extra_stop_tokens`` adds a family's stop tokens (see :func:`stop_token_ids`).
    ``skip_special_tokens=False`` keeps special tokens in the decoded text (padding after the
    stop included) for ``postprocess``, a family's parser of its response format (gpt-oss:
    the ``final`` channel's text of a harmony response).

    Returns one completion per prompt, without the prompt: ``postprocess(text)`` when given,
    else the text (special tokens skipped) stripped of surrounding whitespace.
    """
    texts = prompt_texts(tokenizer, prompts)
    ensure_pad_token(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer, model, extra_stop_tokens)
    device = next(model.parameters()).device
    outs: list[str] = []
    try:
        for k in range(0, len(texts), batch_size):
            chunk = texts[k:k + batch_size]
            has_bos = tokenizer.bos_token and all(t.startswith(tokenizer.bos_token) for t in chunk)
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=not has_bos).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                eos_token_id=stops or None, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=skip_special_tokens))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [postprocess(o) if postprocess else o.strip() for o in outs]


def loss_from_batch(model, batch: dict, num_items_in_batch=None, **extra: Any) -> torch.Tensor:
    """Forward with ``use_cache=False`` (required for packed rows: see FINDINGS.md) and return
    the model's loss, normalised by ``num_items_in_batch`` label tokens when given.

    Decoder-only text models get the same loss from the LM head applied to the labelled
    positions only (:func:`label_only_loss`), verified once per model against the model's own
    loss."""
    kwargs = dict(batch)
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "is_encoder_decoder", False):
        kwargs.setdefault("use_cache", False)
    kwargs.update(extra)
    loss = label_only_loss(model, kwargs, num_items_in_batch)
    if loss is not None:
        return loss
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    out = model(**kwargs)
    return out.loss


#: config attributes that transform logits after the LM head (softcapping, scaling): models that
#: set one keep their own forward (the list TRL's ``add_fused_lm_head`` handles, trl 1.16)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")
_PLAIN_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "use_cache"})
_VERDICT = "_plugtune_label_only_head"


def _label_only_parts(model, kwargs: dict):
    """``(base, backbone, head, softcap)`` when the loss may be computed from the labelled
    positions' hidden states alone, else ``None``: a bare (or peft-wrapped, not
    DDP/DeepSpeed-wrapped) decoder-only text ``PreTrainedModel`` with a plain ``nn.Linear``
    head, no router loss, only text inputs in the batch, and logits that are either the head's
    output unchanged (``softcap=None``) or the head's output soft-capped exactly as
    :func:`head_forward` recognises (``softcap`` = ``config.final_logit_softcapping``, Gemma 2 /
    3 / 4). Any other logit transform (``logit_scale`` ...) keeps the model's own forward."""
    from transformers import PreTrainedModel

    if "labels" not in kwargs or set(kwargs) - _PLAIN_INPUTS:
        return None
    base = model
    if hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):
        base = model.get_base_model()  # peft
    if not isinstance(base, PreTrainedModel) or getattr(base, _VERDICT, None) is False:
        return None
    cfg = base.config
    if (getattr(cfg, "is_encoder_decoder", False) or cfg.get_text_config() is not cfg
            or getattr(cfg, "output_router_logits", False)):
        return None
    head = base.get_output_embeddings()
    backbone = base.base_model
    if type(head) is not nn.Linear or backbone is base:
        return None
    attr = next((n for n, m in base.named_children() if m is head), None)
    kind = head_forward(type(base), attr) if attr is not None else None
    if kind is None:
        return None
    softcap = getattr(cfg, "final_logit_softcapping", None) if kind == "softcap" else None
    handled = {"final_logit_softcapping"} if kind == "softcap" else set()
    if any(getattr(cfg, a, None) is not None for a in _LOGIT_TRANSFORMS if a not in handled):
        return None
    return base, backbone, head, softcap


#: the only logit transform the label-only head reproduces: Gemma 2 / 3 / 4's final-logit soft
#: cap, ``cap * tanh(logits / cap)`` (Gemma Team 2024, "Gemma 2", arXiv:2408.00118 §2;
#: transformers ``Gemma2ForCausalLM.forward``), as these exact statements right after the head
_SOFTCAP_BLOCK = """
if self.config.final_logit_softcapping is not None:
    {v} = {v} / self.config.final_logit_softcapping
    {v} = torch.tanh({v})
    {v} = {v} * self.config.final_logit_softcapping
"""


def plain_head_forward(cls: type, head_attr: str) -> bool:
    """True when ``cls.forward``'s logits are exactly ``self.<head_attr>(hidden)`` (see
    :func:`head_forward`; a soft-capping forward gives ``False``)."""
    return head_forward(cls, head_attr) == "plain"


@functools.cache
def head_forward(cls: type, head_attr: str) -> str | None:
    """How ``cls.forward`` turns ``self.<head_attr>(hidden)`` into logits, read from its source
    with :mod:`ast` once per class.

    Returns:
        ``"plain"``: the head is called once, its result assigned once (optionally
        ``.contiguous()``) and never changed after (no reassignment, augmented or in-place op);
        ``"softcap"``: the same, except that the statement right after the head's assignment is
        exactly Gemma's final-logit soft cap (:data:`_SOFTCAP_BLOCK`, three reassignments guarded
        by ``self.config.final_logit_softcapping is not None``) and nothing else writes the
        logits; ``None``: anything else (RecurrentGemma's ``logits_soft_cap``, Cohere's logit
        scale, an unreadable forward): such models keep their own loss.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (OSError, TypeError, SyntaxError):
        return None

    def is_head_call(node) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == head_attr and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self")

    calls = [n for n in ast.walk(tree) if is_head_call(n)]
    if len(calls) != 1:
        return None
    var, assign = None, None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                    and value.func.attr == "contiguous" and not value.args):
                value = value.func.value
            if is_head_call(value):
                var, assign = node.targets[0].id, node
    if var is None:
        return None
    writes = 0
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                   if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
        writes += sum(isinstance(t, ast.Name) and t.id == var for t in targets)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == var
                and node.func.attr.endswith("_") and not node.func.attr.startswith("_")):
            return None  # in-place op on the logits (mul_, clamp_ ...)
    if writes == 1:
        return "plain"
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    at = next((i for i, stmt in enumerate(body) if stmt is assign), None)
    cap = ast.dump(ast.parse(_SOFTCAP_BLOCK.format(v=var)).body[0])
    if (writes == 4 and at is not None and at + 1 < len(body)
            and ast.dump(body[at + 1]) == cap):
        return "softcap"
    return None


def label_only_loss(model, kwargs: dict, num_items_in_batch=None) -> torch.Tensor | None:
    """The causal-LM loss with the LM head applied only where a label is trained.

    Prompt tokens (``-100`` labels), packed-sample boundaries and padding need no logits, yet a
    plain forward projects every position onto the vocabulary: with a 32k vocabulary that is
    most of a small model's step. Here the backbone runs as usual, then only the hidden states
    of positions ``t`` with ``labels[t + 1] != -100`` go through the head and the float32
    cross-entropy, summed and divided by ``num_items_in_batch`` (else by the number of
    labelled tokens), as transformers' ``ForCausalLMLoss`` does (the idea of TRL's fused LM
    head, which on CPU still scores every position). Models whose forward soft-caps the logits
    (Gemma 2 / 3 / 4, ``config.final_logit_softcapping``) get the same cap on the labelled
    positions' logits (:func:`softcap_logits`), so their 256k-vocabulary logits are never built
    for the prompt tokens either.

    The first call for a model checks the path on one row of the batch against the model's own
    forward (no grad, same RNG state, so dropout matches) and keeps it only if both losses agree
    (rtol 1e-4); otherwise the model is marked and always uses its own forward.

    Args:
        model: the (possibly peft-wrapped) model; kwargs: its inputs incl. ``labels``
            ``(batch, seq)``.

    Returns:
        The scalar loss, or ``None`` when this path does not apply (see ``_label_only_parts``).
    """
    parts = _label_only_parts(model, kwargs)
    if parts is None:
        return None
    # never with a cache: with ``use_cache=True`` transformers ignores the position-id restarts
    # and packed samples attend to each other (../shared/FINDINGS.md), and the one-row check
    # below would compare two equally wrong losses
    kwargs = {**kwargs, "use_cache": False}
    base, backbone, head, softcap = parts
    if (getattr(base, _VERDICT, None) is None
            and not _verify_label_only(model, base, backbone, head, kwargs, softcap)):
        return None
    return _label_only(backbone, head, kwargs, num_items_in_batch, softcap)


def disable_label_only_head(model) -> None:
    """Make :func:`label_only_loss` step aside for ``model`` (peft-wrapped or bare), so the
    model's own forward computes the loss: used when Liger's fused linear cross-entropy has
    replaced that forward (it never builds logits at all, plugtune's head builds the trained
    positions' ones)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    setattr(base, _VERDICT, False)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (Gemma 2's final-logit soft cap, Gemma Team 2024,
    arXiv:2408.00118 §2), in the logits' dtype and in the order transformers'
    ``Gemma2ForCausalLM.forward`` computes it (divide, tanh, multiply), so that the label-only
    loss equals the model's own to float rounding; ``cap=None`` returns ``logits`` unchanged.

    Args:
        logits: ``(..., vocab)`` raw head outputs; cap: the soft cap (> 0, e.g. 30.0).
    """
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _label_only(backbone, head, kwargs: dict, num_items_in_batch=None,
                softcap: float | None = None) -> torch.Tensor:
    labels = kwargs["labels"]
    out = backbone(**{k: v for k, v in kwargs.items() if k != "labels"})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    shift = labels[:, 1:].to(hidden.device)
    keep = shift != -100
    logits = softcap_logits(head(hidden[:, :-1][keep]), softcap).float()
    loss = nn.functional.cross_entropy(logits, shift[keep], reduction="sum")
    denom = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return loss / (denom.to(loss.device) if torch.is_tensor(denom) else denom)


def _verify_label_only(model, base, backbone, head, kwargs: dict,
                       softcap: float | None = None) -> bool:
    """Compare :func:`_label_only` with the model's own loss on the first row that has labels
    (no grad, equal RNG states); record the verdict on ``base``. ``False`` = do not use it now."""
    labels = kwargs["labels"]
    rows = (labels[:, 1:] != -100).any(dim=1).nonzero()
    if not len(rows):
        return False  # nothing to compare on yet; decide on a later batch
    r = int(rows[0])
    one = {k: v[r:r + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == labels.shape[0] else v
           for k, v in kwargs.items()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore() -> None:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    with torch.no_grad():
        ref = model(**one).loss.float()
        restore()
        mine = _label_only(backbone, head, one, softcap=softcap)
        restore()
    ok = bool(torch.allclose(mine, ref.to(mine.device), rtol=1e-4, atol=1e-6))
    setattr(base, _VERDICT, ok)
    if not ok:
        log.info("%s: label-only LM head disagrees with the model's loss (%.6g vs %.6g); "
                 "using the model's forward", type(base).__name__, mine.item(), ref.item())
    return ok
