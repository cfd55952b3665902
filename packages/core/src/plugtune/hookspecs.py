"""The plugtune hook specifications.

Every hook is prefixed ``plugtune_``. Family hooks are *claim or pass*: they are
``firstresult=True``, so a plugin returns ``None`` unless the model belongs to one of its
families, and core's generic fallbacks (``plugtune.default_plugins``) are ``trylast=True``.
An implementation may accept any subset of a hook's arguments (pluggy passes only those it
names), so core can add arguments later without breaking published plugins.

The ``spec`` argument is a :class:`plugtune.spec.ModelSpec`: the resolved family, model type,
path, dtype, quantization and the validated recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable, Sequence

    import torch
    from pydantic import BaseModel

    from plugtune.spec import Family, Loaded, Method, ModelSpec

    #: ``rows(tokenizer, messages, tools) -> list of message lists`` (see plugtune_chat_rows)
    ChatRows = Callable[[Any, list[dict], list[dict] | None], list[list[dict]]]

hookspec = pluggy.HookspecMarker("plugtune")
hookimpl = pluggy.HookimplMarker("plugtune")


@hookspec
def plugtune_families() -> Sequence[Family]:
    """Declare the model families this plugin owns (1:N: every plugin answers).

    Returns:
        A sequence of :class:`plugtune.spec.Family`, each naming the family and the
        ``config.model_type`` values (``transformers`` ``PretrainedConfig.model_type``) it
        claims. Core builds a routing table from all answers; two plugins claiming one
        ``model_type`` raise :class:`plugtune.plugins.PluginConflictError` naming both.
    """


@hookspec
def plugtune_methods() -> Sequence[Method]:
    """Declare the training methods this plugin provides (1:N: every plugin answers).

    Core's own methods (``sft``, ``dpo`` ...) are built-in plugins answering this hook
    (``plugtune.methods``); a third party publishes ``plugtune-<method>`` the same way.

    Returns:
        A sequence of :class:`plugtune.spec.Method`: its name and aliases (values of the
        recipe's ``rl:`` key), the data kinds it accepts, its ``run(ctx)`` function (a callable
        or a lazily imported ``"module:function"``) and an optional pydantic model of the recipe
        keys it adds. Two plugins declaring one name raise
        :class:`plugtune.plugins.PluginConflictError`; a recipe naming no installed method
        raises :class:`plugtune.config.RecipeError` listing the installed ones.

    The module answering this hook is imported whenever a recipe is validated: keep torch,
    transformers and trl imports inside functions (``Method.run`` as ``"module:function"``).
    """


@hookspec
def plugtune_recipe_keys() -> Sequence[type[BaseModel]]:
    """Add recipe keys: pydantic models merged into the recipe schema (1:N).

    Each answer is a ``pydantic.BaseModel`` subclass whose fields are extra top-level recipe
    keys (give every field a default; use ``model_config = ConfigDict(extra="forbid")``).
    They are validated like core keys (wrong types and unknown keys name the key path) and
    read back as attributes of the recipe (``recipe.my_key``). A method's own keys may
    instead be given as :attr:`plugtune.spec.Method.keys`. As for ``plugtune_methods``,
    keep heavy imports out of the module top: recipe validation must stay fast.
    """


@hookspec(firstresult=True)
def plugtune_load(spec: ModelSpec) -> Loaded | None:
    """Load the model and its tokenizer (or processor) for training.

    Apply the family's loading quirks here: dtype policy, attention implementation,
    quantization (``spec.quantization`` is ``None``, ``"4bit"`` or ``"8bit"``), pad token,
    padding side, remote-code mapping. Must honour ``spec.trust_remote_code`` (off unless the
    recipe turns it on) and load safetensors by default.

    Returns:
        :class:`plugtune.spec.Loaded` ``(model, tokenizer, processor)``, or ``None`` to pass.
    """


@hookspec(firstresult=True)
def plugtune_target_modules(spec: ModelSpec, model: Any, method: str) -> list[str] | str | None:
    """Name the modules an adapter wraps.

    Args:
        spec: the resolved model spec.
        model: the loaded (possibly quantized) model, before PEFT wrapping.
        method: ``"auto"`` (the family's default, e.g. ``["q", "v"]`` for T5) or
            ``"all-linear"`` (every ``nn.Linear`` of the language model except ``lm_head``).

    Returns:
        A list of module-name suffixes or a regex string, as ``peft.LoraConfig.target_modules``
        accepts; ``None`` to pass. For a mixture-of-experts model core resolves the answer to
        exact module names without routers and routed experts, whatever the plugin returned
        (:mod:`plugtune.moe`; a recipe that names one is an error, ``lora_target_parameters``
        opts the experts in).
    """


@hookspec(firstresult=True)
def plugtune_encode(
    spec: ModelSpec, processor: Any, tokenizer: Any, example: dict, max_len: int,
    template: Any,
) -> dict | None:
    """Tokenize one canonical example of a processor-based (``task: "vision"``) family.

    Called by the data pipeline (inside ``datasets.map``) for every train/eval example when the
    family's task is ``"vision"``; text families never see it.

    Args:
        processor: ``Loaded.processor`` (e.g. a ``transformers`` ``ProcessorMixin``).
        tokenizer: ``Loaded.tokenizer`` (its chat template is already set).
        example: a canonical chat example, ``{"messages": [...], "images": [paths]}``, whose
            message texts hold one ``plugtune.data.formats.IMAGE_PLACEHOLDER`` per image;
            ``images`` may be empty (a text-only sample).
        max_len: ``sequence_len``: the most tokens a row may have *after* image expansion.
        template: the probed :class:`plugtune.data.tokenize.TemplateInfo`.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "length": int, "status": str,
        "images": list[str]}``: ids with every image placeholder already expanded to the
        model's image tokens; labels ``-100`` on prompt and image tokens; ``status`` one of
        ``"kept"``, ``"truncated"`` (prompt text cut, never inside an image's tokens) or
        ``"dropped"`` (over-long; counted by the pipeline); ``None`` to pass.
    """


@hookspec(firstresult=True)
def plugtune_chat_rows(spec: ModelSpec, tokenizer: Any) -> ChatRows | None:
    """Return the function that turns one chat example into the conversations to train on.

    Called once per run, before the data is tokenized, for text families. For a family whose
    chat template renders earlier turns differently from the last one (Qwen3 keeps
    ``<think>...</think>`` only in the assistant turns after the last user turn), one row per
    conversation cannot train every turn as the template renders it at inference; the family
    splits the conversation instead, and may normalise its messages (where the reasoning is
    written, whether it is kept).

    The returned function must be picklable (it runs inside ``datasets.map``, possibly in worker
    processes) and is called as ``rows(tokenizer, messages, tools)``:

    * ``messages``: the canonical messages (``role``, ``content``, optional ``reasoning_content``,
      ``tool_calls``, ``train``), ``tools``: the function schemas or ``None``;
    * it returns a list of message lists; each is tokenized by core as one row
      (:func:`plugtune.data.tokenize.tokenize_chat`: the same label masking, length policy and
      ``train_on_eos``). In each row an assistant message with ``"train": False`` is context
      only, and an untrained turn the template renders differently later is folded into the
      next prompt as the template renders it there.

    Rows of one example count as separate samples in the data statistics.

    Returns:
        The function, or ``None`` to pass (each conversation is one row, as it is).
    """


@hookspec(firstresult=True)
def plugtune_collate(
    spec: ModelSpec, tokenizer: Any, processor: Any = None
) -> Callable[[list[dict]], dict] | None:
    """Return the collate function used for every batch of the run.

    Called once per run. The function must be picklable (dataloader workers) and turn a list
    of tokenized features (``input_ids``, ``labels`` and optionally ``position_ids``, each a
    list of ints) into a dict of tensors of shape ``(batch, seq)``. Labels are padded with
    ``-100``, never with the pad id. ``processor`` is ``Loaded.processor`` (default ``None``:
    text families); vision features also carry ``images`` (paths), which the collate function turns
    into the model's pixel inputs.
    """


@hookspec(firstresult=True)
def plugtune_train_step(
    spec: ModelSpec, model: Any, batch: dict, num_items_in_batch: int | None
) -> torch.Tensor | None:
    """Compute the loss of one micro-batch (called from ``Trainer.compute_loss``).

    Args:
        batch: the collated tensors, shape ``(batch, seq)`` each.
        num_items_in_batch: number of label tokens (``labels != -100``) over the whole
            gradient-accumulation step, from ``transformers.Trainer``; divide the summed token
            loss by it so the loss is normalised per label token across micro-batches.

    Returns:
        A scalar loss tensor, or ``None`` to pass.
    """


@hookspec(firstresult=True)
def plugtune_generate(
    spec: ModelSpec,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    images: Sequence[Any] | None,
    processor: Any = None,
) -> list[str] | None:
    """Generate one completion per prompt (greedy unless the plugin says otherwise).

    ``prompts`` are user messages; the implementation renders them with the run's chat template
    or prompt format. Stops on the end-of-sequence *and* end-of-turn tokens.

    ``images`` (vision families): ``None``, or one entry per prompt (an image path or PIL image,
    a list of them, or ``None`` for a text-only prompt); with a single prompt a flat list of
    paths all belongs to it (``plugtune generate --prompt P --image A --image B``).
    ``processor`` is ``Loaded.processor`` (default ``None``: text families).

    Returns:
        A list of strings, ``len(prompts)`` long, without the prompt; ``None`` to pass.
    """
