"""Tiny random-weight Gemma models for tests, saved with a real tokenizer.

The vocabulary of the model is the tokenizer's length, so every token id is valid.
"""

from __future__ import annotations

from pathlib import Path

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma4_text")


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A 2-layer config of hidden size 32 for ``model_type``: one sliding-window layer and one
    global layer (Gemma 2 / 3 / 4), a window of 4 tokens (shorter than any packed row of the
    tests, so it binds), Gemma 4's per-layer inputs shrunk to 8.

    Raises:
        ValueError: ``model_type`` is not one of :data:`MODEL_TYPES`.
    """
    from transformers import CONFIG_MAPPING

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=512)
    if model_type != "gemma":
        common.update(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    if model_type == "gemma4_text":
        common.update(hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab_size)
    return CONFIG_MAPPING[model_type](**{**common, **overrides})


def save_tiny(model_type: str, dest: str | Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Build a tiny random ``model_type`` model sized to ``tokenizer`` and save both to ``dest``.

    Returns:
        ``dest`` as a :class:`~pathlib.Path` (``config.json``, ``model.safetensors``, tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, len(tokenizer), **overrides)
    for name in ("eos", "bos", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id")
        if tid is not None:
            setattr(cfg, f"{name}_token_id", tid)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
