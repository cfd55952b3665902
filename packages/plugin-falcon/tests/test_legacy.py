"""Legacy RefinedWeb / RefinedWebModel checkpoints load into native Falcon without remote code."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconForCausalLM

from plugtune.modeling import ModelLoadError
from plugtune.testing import make_spec
from plugtune.train import read_model_type
from plugtune_falcon._legacy import falcon_config_from_legacy, legacy_to_kwargs

# The config.json of the original remote-code releases (values from tiiuae/falcon-7b and
# tiiuae/falcon-40b before their port to transformers; auto_map trimmed).
FALCON_7B_RW = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["RWForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_RW.RWConfig"}, "bias": False, "bos_token_id": 11,
    "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "RefinedWebModel", "multi_query": True,
    "n_head": 71, "n_layer": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024,
}
FALCON_40B_RW = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["RWForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_RW.RWConfig"}, "bias": False, "bos_token_id": 11,
    "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 8192, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "RefinedWeb", "n_head": 128, "n_head_kv": 8,
    "n_layer": 60, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024,
}


def _meta_model(raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = falcon_config_from_legacy(tmp_path)
    with torch.device("meta"):
        return cfg, FalconForCausalLM(cfg)


def test_falcon_7b_layout(tmp_path):
    """Multi-query: one shared K/V head -> fused qkv of (71 + 2) * 64 = 4672 rows (the published
    falcon-7b ``query_key_value.weight`` is [4672, 4544])."""
    cfg, model = _meta_model(FALCON_7B_RW, tmp_path)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim) == (71, 32, 64)
    assert cfg.multi_query and not cfg.new_decoder_architecture
    layer = model.transformer.h[0]
    assert tuple(layer.self_attention.query_key_value.weight.shape) == (4672, 4544)
    assert hasattr(layer, "input_layernorm") and not hasattr(layer, "ln_attn")
    assert len(model.transformer.h) == 32


def test_falcon_40b_layout(tmp_path):
    """New decoder architecture: 8 KV groups -> (128 + 2 * 8) * 64 = 9216 rows (falcon-40b's
    ``query_key_value.weight`` is [9216, 8192]), separate ``ln_attn`` / ``ln_mlp``."""
    cfg, model = _meta_model(FALCON_40B_RW, tmp_path)
    assert cfg.new_decoder_architecture and cfg.num_kv_heads == 8
    layer = model.transformer.h[0]
    assert tuple(layer.self_attention.query_key_value.weight.shape) == (9216, 8192)
    assert hasattr(layer, "ln_attn") and hasattr(layer, "ln_mlp")


def test_bad_legacy_configs_name_the_field():
    broken = {k: v for k, v in FALCON_7B_RW.items() if k != "n_layer"}
    with pytest.raises(ModelLoadError, match="n_layer"):
        legacy_to_kwargs(broken, "x/config.json")
    with pytest.raises(ModelLoadError, match="apply_residual_connection_post_layernorm"):
        legacy_to_kwargs({**FALCON_7B_RW, "apply_residual_connection_post_layernorm": True})
    with pytest.raises(ModelLoadError, match="not a legacy Falcon type"):
        legacy_to_kwargs({**FALCON_7B_RW, "model_type": "falcon"})


def test_bad_value_type_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**FALCON_7B_RW, "n_head": "many"}))
    with pytest.raises(ModelLoadError, match="config.json"):
        falcon_config_from_legacy(tmp_path)


@pytest.mark.parametrize("variant", ["multi_query", "new_decoder", "alibi"])
def test_legacy_folder_loads_same_weights_without_remote_code(tiny_dirs, variant):
    native_dir, legacy_dir = tiny_dirs(variant), tiny_dirs(variant, legacy=True)
    mt, cfg = read_model_type(str(legacy_dir))
    assert mt in ("RefinedWeb", "RefinedWebModel") and cfg is None  # transformers can't build it
    spec, pm = make_spec(mt, path=str(legacy_dir))
    assert spec.trust_remote_code is False
    loaded = pm.hook.plugtune_load(spec=spec)
    assert type(loaded.model) is FalconForCausalLM
    native = AutoModelForCausalLM.from_pretrained(native_dir).eval()
    ids = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded.model.eval()(ids).logits
        want = native(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
