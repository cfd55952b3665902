"""Encoder-decoder generation for T5-family models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def source_text(prompt: str | Sequence[dict]) -> str:
    """The encoder input for one prompt.

    A string is used as is. A message list (``[{"role", "content"}, ...]``, what the data
    pipeline hands over for held-out seq2seq examples) becomes its non-assistant contents joined
    by a blank line: the same view ``plugtune.data.pipeline`` trains on for chat-format data.

    Raises:
        ValueError: a message list without any user/system content.
    """
    if isinstance(prompt, str):
        return prompt
    parts = [m["content"] for m in prompt if m.get("role") != "assistant" and m.get("content")]
    if not parts:
        raise ValueError(f"prompt has no user content to encode: {prompt!r}")
    return "\n\n".join(parts)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[str | Sequence[dict]], max_new_tokens: int,
                 max_source_len: int | None = None, batch_size: int = 8, do_sample: bool = False,
                 **gen_kwargs: Any) -> list[torch.Tensor]:
    """Generated decoder ids per prompt (batched, right-padded encoder inputs).

    ``max_new_tokens`` is passed explicitly, so the ``max_length=20`` default of
    ``GenerationConfig`` never cuts a summary short. The model is put in eval mode (dropout off)
    and restored afterwards.

    Returns:
        One 1-d ``LongTensor`` per prompt: the decoder sequence *without* the decoder start
        token, at most ``max_new_tokens`` long (shorter when EOS ends it; pads stripped).
    """
    texts = [source_text(p) for p in prompts]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[torch.Tensor] = []
    try:
        for k in range(0, len(texts), batch_size):
            enc = tokenizer(texts[k:k + batch_size], return_tensors="pt", padding=True,
                            truncation=max_source_len is not None, max_length=max_source_len)
            enc = {n: t.to(device) for n, t in enc.items() if n in ("input_ids", "attention_mask")}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 use_cache=True, pad_token_id=pad, **gen_kwargs)
            for row in gen[:, 1:].cpu():  # drop the decoder start token
                keep = row.ne(pad).nonzero()
                out.append(row[: int(keep[-1]) + 1] if len(keep) else row[:0])
    finally:
        model.train(was_training)
    return out


def generate_seq2seq(model, tokenizer, prompts: Sequence[str | Sequence[dict]],
                     max_new_tokens: int, **kwargs: Any) -> list[str]:
    """One completion string per prompt (special tokens skipped, stripped); see :func:`generate_ids`."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
