"""Value types passed to and returned from hooks.

Importing this module is cheap (no torch): the plugin manager and the recipe validation
(which collects the methods' recipe keys) import it before any model work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel

    from plugtune.config import Recipe


@dataclass(frozen=True)
class Family:
    """A model family a plugin owns.

    Attributes:
        name: family name, e.g. ``"llama"``.
        model_types: ``transformers`` ``config.model_type`` values it claims (``"llama"``,
            ``"qwen2"`` ...). Two plugins claiming one value is an error.
        task: ``"causal"``, ``"seq2seq"`` or ``"vision"`` (selects the Trainer and data path).
        description: one line shown by ``plugtune plugins``.
        quirks: one short line per quirk the plugin handles (``"<bos> once"``, ``"final-logit
            softcap in the label-only loss"`` ...), listed by ``plugtune families``.
        packing: ``"auto"`` (core decides per architecture: exact for softmax attention with
            position-id restarts, refused for recurrent / linear-attention / hybrid layers, see
            :mod:`plugtune.architectures`), ``"exact"`` (the plugin vouches and a test shows it)
            or ``"refused"`` (``packing_reason`` says why).
        packing_reason: why packing is refused (shown in the error and by ``plugtune families``).
        attn_implementation: the attention implementation the family needs when it cannot use
            plugtune's default ``sdpa`` (gpt-oss: ``"eager"``); ``None`` keeps the default.
        tests: test ids (``path::name``) that show the quirks, listed by ``plugtune families``.
    """

    name: str
    model_types: tuple[str, ...]
    task: str = "causal"
    description: str = ""
    quirks: tuple[str, ...] = ()
    packing: str = "auto"
    packing_reason: str = ""
    attn_implementation: str | None = None
    tests: tuple[str, ...] = ()


@dataclass
class Loaded:
    """What ``plugtune_load`` returns: the model, its tokenizer and, for vision, a processor."""

    model: Any
    tokenizer: Any
    processor: Any = None


@dataclass
class ModelSpec:
    """Everything a family hook needs to know about the model of this run.

    Attributes:
        path: ``base_model`` (local folder or hub id).
        model_type: routed ``config.model_type``.
        family: the claiming :class:`Family`.
        plugin: name of the plugin that claimed it.
        hf_config: the ``transformers`` config (``PretrainedConfig``) when known.
        recipe: the validated recipe.
        torch_dtype: compute/weight dtype chosen by the dtype policy.
        quantization: ``None``, ``"4bit"`` (NF4, double quant) or ``"8bit"``.
    """

    path: str
    model_type: str
    family: Family
    plugin: str
    recipe: Recipe
    hf_config: Any = None
    torch_dtype: torch.dtype | None = None  # None: torch.float32
    quantization: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.torch_dtype is None:
            import torch

            self.torch_dtype = torch.float32

    @property
    def task(self) -> str:
        return self.family.task

    @property
    def trust_remote_code(self) -> bool:
        return self.recipe.trust_remote_code

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


def cuda_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_dtype(requested: str) -> torch.dtype:
    """The dtype policy for ``dtype: auto | fp32 | bf16 | fp16``.

    ``auto`` picks bf16 on CUDA devices that support it and fp32 elsewhere: on CPUs without AMX
    bf16 matmuls are ~22x slower than fp32 (measured, ../shared/FINDINGS.md).
    """
    import torch

    if requested == "auto":
        return torch.bfloat16 if cuda_supports_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


@dataclass(frozen=True)
class Method:
    """A training method (``sft``, ``dpo``, ``kto`` ...) a plugin declares through
    ``plugtune_methods``; core's own methods are built-in plugins declared the same way
    (``plugtune.methods``).

    Attributes:
        name: the value of the recipe's ``rl:`` key (``"sft"`` when ``rl`` is unset).
        run: ``run(ctx: plugtune.trainer.MethodContext) -> plugtune.trainer.RunResult``: builds
            the method's Trainer from the prepared data and the loaded (not yet adapted) model,
            trains, saves the run directory. Either the callable or a ``"module:function"``
            string, imported only when the method runs (keeps recipe validation free of torch).
        aliases: other ``rl:`` values that select this method (e.g. ``ipo`` for DPO with
            ``loss_type: ipo``; the method reads ``recipe.rl`` to tell which was asked).
        data_kinds: the :attr:`plugtune.data.PreparedData.kind` values the method accepts
            (``"chat"``, ``"text"``, ``"seq2seq"``, ``"vision"``, ``"preference"`` ...); an
            empty tuple accepts any. A mismatch is a ``TrainingError`` naming both.
        keys: a pydantic model of the recipe keys the method adds (merged into the recipe
            schema, validated like core keys); ``None`` when it adds none.
        description: one line shown by ``plugtune plugins``.
    """

    name: str
    run: Callable[..., Any] | str
    aliases: tuple[str, ...] = ()
    data_kinds: tuple[str, ...] = ()
    keys: type[BaseModel] | None = None
    description: str = ""

    def load_run(self) -> Callable[..., Any]:
        """The ``run`` callable (imports ``"module:function"`` strings)."""
        if callable(self.run):
            return self.run
        import importlib

        mod, _, fn = self.run.partition(":")
        return getattr(importlib.import_module(mod), fn)
