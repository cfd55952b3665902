"""Tiny random-weight Phi-3-family models (tests, recipe checks): 2 layers, hidden 64.

``phi3`` is laid out like Phi-3-mini / Phi-3.5-mini (full rotary, untied head); ``phi4_mini``
like Phi-4-mini (``partial_rotary_factor`` 0.75, tied embeddings), both ``model_type: phi3``.
"""

from __future__ import annotations

from pathlib import Path

#: per-variant overrides of :func:`tiny_config`
VARIANTS = {"phi3": {}, "phi4_mini": {"partial_rotary_factor": 0.75, "tie_word_embeddings": True}}


def tiny_config(vocab_size: int, variant: str = "phi3", **overrides):
    """A 2-layer ``Phi3Config`` (hidden 64, 4 heads, 2 KV heads, intermediate 128).

    Raises:
        ValueError: unknown ``variant`` (see :data:`VARIANTS`).
    """
    from transformers import Phi3Config

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return Phi3Config(**{**dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=None), **VARIANTS[variant], **overrides})


def phi3_tokenizer(llama2_tokenizer):
    """Llama 2's tokenizer turned into Phi-3's vocabulary: Phi-3 keeps Llama 2's 32000
    sentencepiece pieces and adds :data:`plugtune_phi._fused.PHI3_ADDED_TOKENS` as ids
    32000-32010; EOS ``<|endoftext|>``. Modifies and returns the tokenizer."""
    from plugtune_phi._fused import PHI3_ADDED_TOKENS

    llama2_tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_ADDED_TOKENS)},
                                        replace_extra_special_tokens=False)
    llama2_tokenizer.eos_token = "<|endoftext|>"
    return llama2_tokenizer


def save_tiny(dest: str | Path, tokenizer, variant: str = "phi3", seed: int = 0) -> Path:
    """Build a tiny random Phi-3 sized to ``tokenizer`` and save both to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer), variant)
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(cfg, key, getattr(tokenizer, key))
    model = AutoModelForCausalLM.from_config(cfg)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
