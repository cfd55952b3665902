"""Recipe keys that shape the Trainer beyond a one-to-one ``TrainingArguments`` copy.

They come mostly from axolotl configs (:mod:`plugtune.config.dialects.axolotl`):
``evals_per_epoch`` / ``saves_per_epoch``, ``tf32``, ``report_env``, ``hub_model_id``, optimizer
names that need CUDA, and LoRA+ (``loraplus_lr_ratio``). Each notice is logged once per run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

#: optimizers of transformers / bitsandbytes that need a CUDA device -> the CPU fallback
CUDA_OPTIMIZERS = {
    "adamw_bnb_8bit": "adamw_torch", "adamw_8bit": "adamw_torch", "paged_adamw_8bit": "adamw_torch",
    "paged_adamw_32bit": "adamw_torch", "paged_adamw": "adamw_torch", "paged_lion_8bit": "lion_32bit",
    "paged_lion_32bit": "lion_32bit", "lion_8bit": "lion_32bit", "adamw_torch_4bit": "adamw_torch",
    "adamw_torch_8bit": "adamw_torch", "ademamix_8bit": "ademamix", "paged_ademamix_8bit": "ademamix",
    "paged_ademamix_32bit": "ademamix", "rmsprop_bnb_8bit": "rmsprop", "adafactor": None,
}


def optimizer_name(name: str, cuda: bool | None = None) -> str:
    """``name``, or its CPU fallback (with one notice) when it needs CUDA and there is none.

    >>> optimizer_name("adamw_bnb_8bit", cuda=False)
    'adamw_torch'
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fallback = CUDA_OPTIMIZERS.get(name)
    if cuda or fallback is None:
        return name
    log.warning("optimizer %s needs a CUDA device; using %s on this machine", name, fallback)
    return fallback


#: report_to integration -> the modules transformers needs for it (any one of them)
REPORT_MODULES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"),
                  "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "trackio": ("trackio",),
                  "clearml": ("clearml",), "dvclive": ("dvclive",), "swanlab": ("swanlab",)}


def available_reporters(report_to: str | list[str]) -> str | list[str]:
    """``report_to`` without the integrations whose library is not installed (one notice each),
    for ``TrainingArguments`` built outside a run; :func:`plugtune.train.train` refuses a
    missing backend before any model loads (:func:`plugtune.observe.check_reporting`)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], ["all"]):
        return report_to
    kept = []
    for name in names:
        mods = REPORT_MODULES.get(name)
        if mods and not any(importlib.util.find_spec(m) for m in mods):
            log.warning("report_to: %s needs `pip install %s`; not reporting to it", name, mods[0])
            continue
        kept.append(name)
    return kept or "none"


def adjust_training_kwargs(recipe, kwargs: dict[str, Any], cuda: bool | None = None) -> dict[str, Any]:
    """Apply the recipe keys that need more than a copy to ``TrainingArguments`` kwargs.

    - ``evals_per_epoch`` / ``saves_per_epoch``: eval/save every ``1 / (n * num_epochs)`` of the
      run (transformers reads a float ``< 1`` as a share of all steps), unless ``eval_steps`` /
      ``save_steps`` are set; with ``max_steps`` the share is of ``max_steps``.
    - ``tf32``: passed on CUDA; elsewhere it has no meaning (one notice).
    - ``report_to``: integrations whose library is missing are dropped (one notice each).
    - ``report_env``: exported for transformers' reporting callbacks (WANDB_PROJECT ...).
    - ``hub_model_id``: ``push_to_hub`` to it.
    - optimizer names that need CUDA fall back on CPU (:func:`optimizer_name`).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    epochs = recipe.num_epochs if recipe.max_steps <= 0 else 1
    if recipe.evals_per_epoch and not recipe.eval_steps and kwargs.get("eval_strategy") != "no":
        kwargs["eval_strategy"] = "steps"
        kwargs["eval_steps"] = min(1.0 / (recipe.evals_per_epoch * epochs), 0.999)
    if recipe.saves_per_epoch and not recipe.save_steps:
        kwargs["save_strategy"] = "steps"
        kwargs["save_steps"] = min(1.0 / (recipe.saves_per_epoch * epochs), 0.999)
    if recipe.tf32 is not None:
        if cuda:
            kwargs["tf32"] = recipe.tf32
        elif recipe.tf32:
            log.warning("tf32: true has no effect without an Ampere+ CUDA device; ignored")
    kwargs["report_to"] = available_reporters(kwargs.get("report_to", recipe.report_to))
    for var, value in recipe.report_env.items():
        os.environ[var] = value
    if recipe.hub_model_id:
        kwargs.update(push_to_hub=True, hub_model_id=recipe.hub_model_id)
    kwargs["optim"] = optimizer_name(kwargs.get("optim", recipe.optimizer), cuda)
    return kwargs


def lora_variant_kwargs(recipe) -> dict[str, Any]:
    """``peft.LoraConfig`` keywords of the PEFT variants: DoRA and rsLoRA."""
    out: dict[str, Any] = {}
    if recipe.peft_use_dora:
        out["use_dora"] = True
    if recipe.peft_use_rslora:
        out["use_rslora"] = True
    return out


def loraplus_optimizers(recipe, model, args) -> tuple[Any, Any]:
    """``Trainer(optimizers=...)`` for LoRA+ (``loraplus_lr_ratio``), else ``(None, None)``.

    Built with ``peft.optimizers.create_loraplus_optimizer`` on the optimizer class that
    ``transformers.Trainer`` would use for ``args.optim``: the B matrices learn at
    ``learning_rate * loraplus_lr_ratio``, adapted embeddings at ``loraplus_lr_embedding``.
    """
    if not recipe.loraplus_lr_ratio or recipe.adapter == "none":
        return (None, None)
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    cls, kw = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kw = {k: v for k, v in kw.items() if k != "lr"}
    opt = create_loraplus_optimizer(
        model=model, optimizer_cls=cls, lr=args.learning_rate,
        loraplus_lr_ratio=recipe.loraplus_lr_ratio,
        loraplus_lr_embedding=recipe.loraplus_lr_embedding or 1e-6,
        weight_decay=args.weight_decay, **kw)
    return (opt, None)
