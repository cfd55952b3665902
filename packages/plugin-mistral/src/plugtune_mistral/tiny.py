"""Tiny random-weight Mistral saved with a real tokenizer (tests, recipe checks).

    python -m plugtune_mistral.tiny DEST [--tokenizer mistral_v1] [--sliding-window 16]

``--tokenizer`` is a folder with a tokenizer, or the name of one in ``../shared/data/tokenizers``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def tiny_config(vocab_size: int, sliding_window: int | None = 16, **overrides):
    """A 2-layer, hidden-32 ``MistralConfig`` (4 query heads, 2 KV heads) whose sliding window
    (default 16 tokens) is shorter than typical test samples, so the window is exercised."""
    from transformers import MistralConfig

    return MistralConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, sliding_window=sliding_window),
                            **overrides})


def save_tiny(dest: str | Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Build a tiny random Mistral sized to ``tokenizer`` and save both to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer), **overrides)
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(cfg, key, getattr(tokenizer, key))
    model = AutoModelForCausalLM.from_config(cfg)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m plugtune_mistral.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest")
    ap.add_argument("--tokenizer", default="mistral_v1")
    ap.add_argument("--sliding-window", type=int, default=16)
    args = ap.parse_args(argv)
    p = Path(args.tokenizer)
    if p.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(p)
    else:
        from plugtune.testing import load_shared_tokenizer

        tok = load_shared_tokenizer(args.tokenizer)
    print(save_tiny(args.dest, tok, sliding_window=args.sliding_window))


if __name__ == "__main__":  # pragma: no cover
    main()
