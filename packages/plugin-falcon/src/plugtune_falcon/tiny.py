"""Tiny random-weight Falcon models saved with a real tokenizer (tests, recipe checks).

    python -m plugtune_falcon.tiny multi_query DEST [--tokenizer falcon] [--legacy]
    python -m plugtune_falcon.tiny new_decoder DEST [--legacy]

``--legacy`` rewrites ``config.json`` the way the original remote-code checkpoints had it
(``model_type: RefinedWebModel`` for multi-query, ``RefinedWeb`` for the new decoder
architecture, keys ``n_head``/``n_layer``/``n_head_kv``, ``auto_map`` to ``RWForCausalLM``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ("multi_query", "new_decoder", "alibi")


def tiny_config(variant: str, vocab_size: int, **overrides):
    """A 2-layer, hidden-32 ``FalconConfig``: ``multi_query`` (7B layout), ``new_decoder``
    (40B layout: 2 KV heads, two layer norms) or ``alibi`` (rw-1b layout).

    Raises:
        ValueError: unknown variant.
    """
    from transformers import FalconConfig

    base = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, bos_token_id=11, eos_token_id=11)
    if variant == "multi_query":
        base.update(multi_query=True, new_decoder_architecture=False, parallel_attn=True)
    elif variant == "new_decoder":
        base.update(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2)
    elif variant == "alibi":
        base.update(alibi=True, multi_query=True, parallel_attn=False, bias=True)
    else:
        raise ValueError(f"unknown Falcon variant {variant!r}; expected one of {VARIANTS}")
    return FalconConfig(**{**base, **overrides})


def legacy_config(cfg) -> dict:
    """The remote-code (``configuration_RW.py``) ``config.json`` equivalent of ``cfg``."""
    mt = "RefinedWeb" if cfg.new_decoder_architecture else "RefinedWebModel"
    out = {
        "alibi": cfg.alibi, "apply_residual_connection_post_layernorm": False,
        "architectures": ["RWForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_RW.RWConfig",
                     "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
        "bias": cfg.bias, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "hidden_dropout": 0.0, "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "model_type": mt,
        "n_head": cfg.num_attention_heads, "n_layer": cfg.num_hidden_layers,
        "parallel_attn": cfg.parallel_attn, "torch_dtype": "float32",
        "transformers_version": "4.27.4", "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if cfg.new_decoder_architecture:
        out["n_head_kv"] = cfg.num_kv_heads
    else:
        out["multi_query"] = cfg.multi_query
    return out


def save_tiny(variant: str, dest: str | Path, tokenizer, legacy: bool = False, seed: int = 0,
              **overrides) -> Path:
    """Build a tiny random Falcon sized to ``tokenizer`` and save both to ``dest``.

    With ``legacy=True`` the saved ``config.json`` is replaced by :func:`legacy_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(variant, len(tokenizer), **overrides)
    if tokenizer.eos_token_id is not None:
        cfg.eos_token_id = cfg.bos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(cfg)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    if legacy:
        (dest / "config.json").write_text(json.dumps(legacy_config(model.config), indent=2))
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m plugtune_falcon.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("dest")
    ap.add_argument("--tokenizer", default="falcon", help="tokenizer folder or shared tokenizer name")
    ap.add_argument("--legacy", action="store_true", help="write a RefinedWeb config.json")
    args = ap.parse_args(argv)
    p = Path(args.tokenizer)
    if p.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(p)
    else:
        from plugtune.testing import load_shared_tokenizer

        tok = load_shared_tokenizer(args.tokenizer)
    print(save_tiny(args.variant, args.dest, tok, legacy=args.legacy))


if __name__ == "__main__":  # pragma: no cover
    main()
