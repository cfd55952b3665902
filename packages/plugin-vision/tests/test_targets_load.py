"""LoRA targets (language model only), loading, the remote-code gate, generation, recipes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import MODEL_TYPES, caption_image, demo_image, tokenizer_for

from plugtune.testing import make_spec

VISION = re.compile(r"(vision_model|vision_tower|visual|multi_modal_projector|connector)")


def _model(model_type):
    from plugtune_vision.tiny import tiny_model

    return tiny_model(model_type, tokenizer_for(model_type))


def _matched(model, regex):
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, n)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_auto_targets_are_the_language_model_linears_only(model_type):
    spec, pm = make_spec(model_type)
    model = _model(model_type)
    regex = pm.hook.plugtune_target_modules(spec=spec, model=model, method="auto")
    assert regex == pm.hook.plugtune_target_modules(spec=spec, model=model, method="all-linear")
    hit = _matched(model, regex)
    from plugtune_vision._targets import language_model_prefix

    prefix = language_model_prefix(model) + "."
    lm = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
          and n.startswith(prefix)]
    assert hit and not any(VISION.search(n) for n in hit)
    assert not any(n.endswith("lm_head") for n in hit)
    if model_type == "mllama":  # layer 1 is the gated cross-attention layer of the tiny config
        assert not any(".layers.1." in n for n in hit)
        assert sorted(hit) == sorted(n for n in lm if ".layers.1." not in n)
    else:
        assert sorted(hit) == sorted(lm)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=regex))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and prefix in n for n in trainable)


def test_mllama_cross_attention_layers_on_request():
    spec, pm = make_spec("mllama", lora_target_cross_attention=True)
    model = _model("mllama")
    hit = _matched(model, pm.hook.plugtune_target_modules(spec=spec, model=model, method="auto"))
    assert {n.rsplit(".", 1)[-1] for n in hit if ".layers.1.cross_attn." in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(VISION.search(n) for n in hit)
    spec, pm = make_spec("qwen2_vl", lora_target_cross_attention=True)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        pm.hook.plugtune_target_modules(spec=spec, model=_model("qwen2_vl"), method="auto")


def test_named_targets_stay_in_the_language_model_and_a_regex_is_verbatim():
    spec, pm = make_spec("qwen2_5_vl")
    model = _model("qwen2_5_vl")  # its vision blocks also have gate_proj/up_proj/down_proj
    hit = _matched(model, pm.hook.plugtune_target_modules(spec=spec, model=model,
                                                          method=["gate_proj", "q_proj"]))
    assert len(hit) == 4 and all(n.startswith("model.language_model.") for n in hit)
    with pytest.raises(ValueError, match="qkv.*not Linear modules of the language model"):
        pm.hook.plugtune_target_modules(spec=spec, model=model, method=["qkv"])
    asked = r"model\.visual\.blocks\.\d+\.attn\.qkv"
    assert pm.hook.plugtune_target_modules(spec=spec, model=model, method=asked) == asked
    with pytest.raises(ValueError, match="matches no module"):
        pm.hook.plugtune_target_modules(spec=spec, model=model, method=r"nothing\.here")


def _recipe_dir(tmp_path, base, **extra):
    from plugtune.config import validate_recipe

    return validate_recipe({"base_model": base, "output_dir": str(tmp_path / "run"),
                            "datasets": [{"path": "unused.json", "type": "vision"}], **extra})


def test_load_from_disk_freezes_the_vision_tower_for_full_fine_tuning(tiny_dirs, tmp_path):
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    pm = get_plugin_manager()
    spec = build_spec(_recipe_dir(tmp_path, tiny_dirs("qwen2_vl"), adapter="none"), pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    assert loaded.processor is not None and loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.processor.image_token == "<|image_pad|>"
    frozen = {n for n, p in loaded.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in n for n in frozen)
    assert any(".visual." in n for n in frozen if "merger" not in n)
    assert all(p.requires_grad for n, p in loaded.model.named_parameters()
               if "language_model" in n or "merger" in n)


def test_original_molmo_needs_trust_remote_code(tmp_path):
    from plugtune.modeling import ModelLoadError
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    base = tmp_path / "molmo-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "molmo",
                                                  "auto_map": {"AutoConfig": "config_molmo.MolmoConfig"}}))
    pm = get_plugin_manager()
    spec = build_spec(_recipe_dir(tmp_path, str(base)), pm)
    assert spec.plugin == "plugtune-vision" and spec.family.name == "molmo"
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        pm.hook.plugtune_load(spec=spec)


def test_generate_with_images_per_prompt():
    from plugtune.data.templates import ensure_chat_template
    from plugtune_vision._images import ImageError
    from plugtune_vision.tiny import tiny_processor

    spec, pm = make_spec("qwen2_vl")
    tok = tokenizer_for("qwen2_vl")
    proc = tiny_processor("qwen2_vl", tok)
    ensure_chat_template(tok, None)
    model = _model("qwen2_vl")
    prompts = ["<image>Who is he?", "Describe both.", "Plain text."]
    images = [demo_image("2.jpg"), [caption_image("horse.png"), caption_image("coffee.png")], None]
    outs = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=prompts,
                                     max_new_tokens=3, images=images, processor=proc)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert tok.padding_side == "right"
    with pytest.raises(ImageError, match="2 image entries for 3 prompts"):
        pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=prompts,
                                  max_new_tokens=3, images=images[:2], processor=proc)
    with pytest.raises(ImageError, match="1 <image> placeholder.*2 image"):
        pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=["<image>a"],
                                  max_new_tokens=3, images=[demo_image("1.jpg")] * 2,
                                  processor=proc)


@pytest.mark.parametrize("name", ["qwen2-vl-mllm-demo-lora", "llama3.2-vision-mllm-demo-lora"])
def test_bundled_vision_recipes_validate(name):
    from plugtune.config import load_recipe

    rec = load_recipe(name, ["base_model=/tmp/tiny", "max_steps=2"])
    assert rec.base_model == "/tmp/tiny" and rec.adapter == "lora"
    assert [d.type for d in rec.datasets] == ["vision", "vision"]
    assert rec.lora_target_cross_attention is False
