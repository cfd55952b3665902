"""The seq2seq training loss, normalised per label token across gradient accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugtune.data.tokenize import IGNORE_INDEX


def _base_model(model):
    """Unwrap DeepSpeed/DDP (``.module``) and PEFT (``get_base_model``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def seq2seq_loss(model, batch: dict, num_items_in_batch=None) -> torch.Tensor:
    """Token-level cross entropy of a T5 batch.

    ``T5ForConditionalGeneration.forward`` accepts ``**kwargs``, so ``transformers.Trainer``
    treats it as handling ``num_items_in_batch`` and stops dividing the loss by the
    gradient-accumulation steps; but T5 returns a per-micro-batch *mean*, which would make the
    effective gradient ``gradient_accumulation_steps`` times too large. Here the summed token
    loss is divided by ``num_items_in_batch`` (label tokens over the whole accumulation step), or
    averaged over this batch's label tokens when it is ``None`` (evaluation).

    Args:
        batch: ``input_ids``/``attention_mask`` ``(B, S)`` and ``labels`` ``(B, T)`` with -100
            on ignored positions. ``decoder_input_ids`` default to ``labels`` shifted right.
        num_items_in_batch: int or 0-d tensor, label tokens in the accumulation step.

    Returns:
        A 0-d float32 tensor (logits are upcast before the softmax).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = _base_model(model).prepare_decoder_input_ids_from_labels(
            labels=labels)
    out = model(**inputs, use_cache=False)
    logits = out.logits.float()
    total = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.to(logits.device).view(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
