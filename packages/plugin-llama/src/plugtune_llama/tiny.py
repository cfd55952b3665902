"""Tiny random-weight Llama / Qwen2 / BLOOM models saved with a real tokenizer (tests, recipe checks).

    python -m plugtune_llama.tiny llama DEST --tokenizer llama2
    python -m plugtune_llama.tiny qwen2 DEST --tokenizer qwen2_5
    python -m plugtune_llama.tiny bloom DEST --tokenizer falcon

``--tokenizer`` is a folder with a tokenizer, or the name of one in ``../shared/data/tokenizers``.
The vocabulary of the model is the tokenizer's length, so every token id is valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def tiny_config(family: str, vocab_size: int, **overrides):
    """A 2-layer config of hidden size 32 for ``family`` (``llama``, ``qwen2`` or ``bloom``).

    Raises:
        ValueError: unknown family.
    """
    from transformers import BloomConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**{**common, **overrides})
    if family == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    if family == "bloom":
        return BloomConfig(**{"vocab_size": vocab_size, "hidden_size": 32, "n_layer": 2, "n_head": 4,
                              **overrides})
    raise ValueError(f"unknown family {family!r}; expected llama, qwen2 or bloom")


def save_tiny(family: str, dest: str | Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Build a tiny random ``family`` model sized to ``tokenizer`` and save both to ``dest``.

    Returns:
        ``dest`` as a :class:`~pathlib.Path` (``config.json``, ``model.safetensors``, tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer), **overrides)
    if tokenizer.eos_token_id is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        cfg.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def _load_tokenizer(name_or_path: str):
    p = Path(name_or_path)
    if p.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(p)
    from plugtune.testing import load_shared_tokenizer

    return load_shared_tokenizer(name_or_path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m plugtune_llama.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["llama", "qwen2", "bloom"])
    ap.add_argument("dest")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder or shared tokenizer name")
    args = ap.parse_args(argv)
    print(save_tiny(args.family, args.dest, _load_tokenizer(args.tokenizer)))


if __name__ == "__main__":  # pragma: no cover
    main()
