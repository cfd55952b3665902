"""Tiny random-weight Qwen3 / Qwen3-MoE / Qwen3.5 (text) / SmolLM3 models (tests, recipe checks).

    python -m plugtune_qwen3.tiny qwen3 DEST --tokenizer qwen3

``--tokenizer`` is a folder with a tokenizer, or the name of one in ``../shared/data/tokenizers``
(SmolLM3's own is not there; its vocabulary comes from Llama 3.2's, ``llama3_2``). The model's
vocabulary is the tokenizer's length, so every token id is valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_5_text", "smollm3")


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A 2-layer config of hidden size 32 for ``model_type`` (one of :data:`MODEL_TYPES`).

    ``qwen3_5_text`` gets one linear-attention and one full-attention layer (its hybrid
    pattern); ``qwen3_moe`` 4 experts, 2 active, with the router auxiliary loss on.

    Raises:
        ValueError: an unknown model type.
    """
    from transformers import AutoConfig

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=512)
    extra: dict = {}
    if model_type == "qwen3_moe":
        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     decoder_sparse_step=1, output_router_logits=True)
    elif model_type == "qwen3_5_text":
        extra = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                     linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    elif model_type == "smollm3":  # its special-token defaults lie outside a small vocabulary
        common.pop("head_dim")
        extra = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return AutoConfig.for_model(model_type, **{**common, **extra, **overrides})


def save_tiny(model_type: str, dest: str | Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Build a tiny random ``model_type`` model sized to ``tokenizer`` and save both to ``dest``.

    Returns:
        ``dest`` as a :class:`~pathlib.Path` (``config.json``, ``model.safetensors``, tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, len(tokenizer), **overrides)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(cfg, attr, getattr(tokenizer, attr))
    model = AutoModelForCausalLM.from_config(cfg)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m plugtune_qwen3.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_type", choices=MODEL_TYPES)
    ap.add_argument("dest")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder or shared tokenizer name")
    args = ap.parse_args(argv)
    if Path(args.tokenizer).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from plugtune.testing import load_shared_tokenizer

        tok = load_shared_tokenizer(args.tokenizer)
    print(save_tiny(args.model_type, args.dest, tok))


if __name__ == "__main__":  # pragma: no cover
    main()
