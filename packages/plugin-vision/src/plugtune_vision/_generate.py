"""Greedy generation with images for the native vision families."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from plugtune.modeling import ensure_pad_token, stop_token_ids
from plugtune_vision._collate import VisionCollator
from plugtune_vision._encode import prompt_features
from plugtune_vision._images import ImageError
from plugtune_vision._processors import VisionFamily


def images_per_prompt(prompts: Sequence[Any], images: Sequence[Any] | None) -> list[list]:
    """Normalise the ``images`` argument of ``plugtune_generate`` to one list per prompt.

    ``None`` -> no images; with one prompt, a flat list of paths / PIL images belongs to it;
    otherwise one entry per prompt (a path, a PIL image, a list of them, or ``None``).

    Raises:
        ImageError: the number of entries matches neither rule.
    """
    if images is None:
        return [[] for _ in prompts]
    if isinstance(images, str | Path) or hasattr(images, "size") and hasattr(images, "mode"):
        images = [images]
    images = list(images)
    if len(prompts) == 1 and not any(isinstance(x, list | tuple) for x in images):
        return [[x for x in images if x is not None]]
    if len(images) != len(prompts):
        raise ImageError(f"{len(images)} image entries for {len(prompts)} prompts: give one entry "
                         "(a path, a list of paths or None) per prompt")
    return [[] if x is None else list(x) if isinstance(x, list | tuple) else [x] for x in images]


@torch.no_grad()
def generate_with_images(model, processor, tokenizer, fam: VisionFamily, prompts: Sequence[Any],
                         images: Sequence[Any] | None, max_new_tokens: int,
                         batch_size: int = 4) -> list[str]:
    """One greedy completion per prompt, without the prompt, special tokens skipped.

    Prompts are user strings (or message lists) with optional ``<image>`` placeholders,
    rendered with the tokenizer's chat template; rows are left-padded and collated exactly as
    in training (:class:`~plugtune_vision._collate.VisionCollator`). Generation stops on EOS
    and the template's end-of-turn token.
    """
    per = images_per_prompt(prompts, images)
    ensure_pad_token(tokenizer)
    collate = VisionCollator(processor, tokenizer.pad_token_id, mode=fam.collate,
                             padding_side="left", token_types_key=fam.token_types_key)
    feats = []
    for p, ims in zip(prompts, per):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        feats.append(prompt_features(processor, tokenizer, fam, msgs, ims))
    stops = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        for k in range(0, len(feats), batch_size):
            batch = collate(feats[k:k + batch_size])
            dtype = getattr(model, "dtype", None) or torch.float32
            batch = {n: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
                     for n, v in batch.items()}
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops or None, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [o.strip() for o in outs]
