"""Tiny random-weight gpt-oss models (tests, recipe checks): 2 layers, hidden 64, 4 experts.

A real gpt-oss tokenizer (o200k_harmony) is not bundled; tests use the nearest real tokenizer
from ``../shared/data/tokenizers`` with the harmony special tokens added
(:func:`plugtune_gpt_oss.harmony.install_template`).
"""

from __future__ import annotations

from pathlib import Path


def tiny_config(vocab_size: int, **overrides):
    """A 2-layer ``GptOssConfig`` (hidden 64, 4 heads of 16, 4 experts, top-2, one sliding
    window layer of width 8 then one full-attention layer); ``overrides`` replace any field."""
    from transformers import GptOssConfig

    # YaRN with an original context that the tiny context really extends (the released
    # checkpoints: factor 32 over 4096); the default 4096 > 256 makes transformers warn
    rope = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
            "rope_theta": 150000.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    return GptOssConfig(**{**dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256, rope_parameters=rope), **overrides})


def save_tiny(dest: str | Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Build a tiny random gpt-oss sized to ``tokenizer`` (``len(tokenizer)``, added tokens
    included) and save both to ``dest`` (safetensors). Returns ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer), **overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(cfg, key, getattr(tokenizer, key))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def save_tiny_mxfp4(dest: str | Path, tokenizer, seed: int = 0) -> Path:
    """A tiny gpt-oss checkpoint laid out like the released MXFP4 ones: ``config.json`` with
    ``quantization_config: {quant_method: mxfp4}`` and the experts stored as
    ``{gate_up_proj,down_proj}_blocks`` (uint8, two FP4 e2m1 values per byte, 32 values per block:
    shape ``(experts, out, in / 32, 16)``) and ``_scales`` (uint8 exponents, bias 127: shape
    ``(experts, out, in / 32)``); everything else bf16.

    Every FP4 code is 2 (the value 1.0) and expert ``e``'s scale is ``127 + e``, so after
    dequantization every weight of expert ``e`` equals ``2 ** e`` whatever the layout: a test
    can check the unpacking without knowing the transposes. Returns ``dest``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    n_exp, hidden, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    scales = (127 + torch.arange(n_exp, dtype=torch.uint8)).view(n_exp, 1, 1)
    for layer in range(cfg.num_hidden_layers):
        for proj, out, inp in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            del state[key]
            state[key + "_blocks"] = torch.full((n_exp, out, inp // 32, 16), 0x22, dtype=torch.uint8)
            state[key + "_scales"] = scales.expand(n_exp, out, inp // 32).contiguous()
    cfg.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(dest)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(dest)
    return dest
