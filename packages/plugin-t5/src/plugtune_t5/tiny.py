"""Tiny random-weight FLAN-T5-shaped models for tests, demos and benchmarks (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_t5_config(vocab_size: int = 32128, d_model: int = 64, num_layers: int = 2,
                   num_heads: int = 4, d_ff: int = 128, gated: bool = True):
    """A ``T5Config`` shaped like FLAN-T5 (T5 v1.1): gated-GELU FFN (``wi_0``, ``wi_1``, ``wo``),
    no decoder-output scaling, vocabulary 32128 (the 32100 tokenizer entries padded to a
    multiple of 128), pad = decoder start = 0, EOS = 1. ``gated=False`` gives original T5's
    ReLU FFN (``wi``, ``wo``)."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                    num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
                    feed_forward_proj="gated-gelu" if gated else "relu",
                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1, dropout_rate=0.0)


def tiny_t5(seed: int = 0, untie: bool = True, **config):
    """A random ``T5ForConditionalGeneration`` from :func:`tiny_t5_config`.

    ``untie=True`` gives it its own ``lm_head`` like FLAN-T5 (transformers 5 builds T5 with the
    head tied to ``shared`` and only unties when a checkpoint holds different head weights).
    """
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(tiny_t5_config(**config))
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    return model


def save_tiny_t5(path: str | Path, tokenizer, seed: int = 0, **config) -> Path:
    """Save :func:`tiny_t5` and ``tokenizer`` to ``path`` (safetensors), for ``base_model: path``."""
    path = Path(path)
    model = tiny_t5(seed=seed, **config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
