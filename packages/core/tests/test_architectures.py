"""The per-architecture contract (issue 22) and the facts it rests on.

``test_contract`` is the table: one row per architecture people fine-tune today, each built
tiny from transformers' config class and run through the real paths on CPU by
:func:`plugtune.testing.architectures.run_contract` (start without ``model_type``, LoRA with
packing or its refusal, packed == unpacked logits, label-only loss, merge, generation stop).
It runs with core's plugins only, so every row must take the generic route; plugin packages run
the same contract for their families with their plugin manager.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from plugtune.architectures import (
    CONTRACT_TYPES,
    ArchitectureError,
    generic_route,
    mask_sees_position_ids,
    packing_support,
    supported_attention,
)
from plugtune.plugins import UnknownModelError, get_plugin_manager, route_model
from plugtune.spec import Family

GENERIC_PLUGIN = "plugtune.default_plugins.causal_lm"



def _core_pm():
    """Core's plugins only (no entry points): every contract row takes the generic route."""
    return get_plugin_manager(load_entrypoints=False)


@pytest.mark.parametrize("model_type", CONTRACT_TYPES)
def test_contract(model_type, tmp_path):
    from plugtune.testing.architectures import TINY, run_contract

    pytest.importorskip("peft")
    assert model_type in TINY, f"no tiny config for {model_type}"
    res = run_contract(model_type, tmp_path, pm=_core_pm(), expect_plugin=GENERIC_PLUGIN)
    assert res.route_line.startswith(f"{model_type}: no family plugin claims it; generic "
                                      f"causal-LM route (AutoModelForCausalLM")
    print(json.dumps(res.row()))  # the per-architecture table (pytest -s)


@pytest.mark.parametrize("model_type", CONTRACT_TYPES)
def test_contract_with_installed_plugins(model_type, tmp_path):
    """The same row through the plugin that claims it where one is installed (the integration
    session installs every plugin); rows no plugin claims are covered by ``test_contract``."""
    from plugtune.plugins import routing_table
    from plugtune.testing.architectures import run_contract

    pm = get_plugin_manager(env={})  # every installed plugin, whatever conftest selects
    route = routing_table(pm).get(model_type)
    if route is None:
        pytest.skip(f"no installed plugin claims {model_type} (test_contract covers it)")
    res = run_contract(model_type, tmp_path, pm=pm, expect_plugin=route.plugin)
    assert res.route_line == "" and res.plugin == route.plugin


# --- the route ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,route", [
    ("qwen3", "causal_lm"), ("lfm2", "causal_lm"), ("gpt_oss", "causal_lm"),
    ("gemma3", "image_text"), ("qwen2_5_vl", "image_text"), ("qwen3_vl", "image_text")])
def test_generic_route_from_transformers_mappings(model_type, route):
    assert generic_route(model_type, AutoConfig.for_model(model_type)).model_type == route


@pytest.mark.parametrize("model_type,why", [
    ("bert", "encoder-only"), ("roberta", "encoder-only"), ("t5", "encoder-decoder"),
    ("bart", "encoder-decoder"), ("clip", "no causal-LM or image-text-to-text class")])
def test_refused_only_what_cannot_work(model_type, why):
    with pytest.raises(ArchitectureError, match=why):
        generic_route(model_type, AutoConfig.for_model(model_type))


def test_unreadable_config_is_refused_with_what_to_do():
    with pytest.raises(ArchitectureError, match="not known to transformers.*trust_remote_code"):
        generic_route("qwen9", None)


def test_decoder_configured_bert_takes_the_causal_route():
    cfg = AutoConfig.for_model("bert", is_decoder=True)
    assert generic_route("bert", cfg).architecture == "BertLMHeadModel"


def test_route_model_prefers_a_claiming_plugin_and_says_the_generic_route_once(monkeypatch):
    import sys
    import types

    from plugtune import hookimpl

    mod = types.ModuleType("claims_qwen3")
    mod.plugtune_families = hookimpl(lambda: [Family("q3", ("qwen3",))])
    monkeypatch.setitem(sys.modules, "claims_qwen3", mod)
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "claims_qwen3"})
    cfg = AutoConfig.for_model("qwen3")
    route, note = route_model(pm, "qwen3", cfg)
    assert (route.plugin, note) == ("claims_qwen3", "")
    route, note = route_model(_core_pm(), "qwen3", cfg)
    assert route.plugin == GENERIC_PLUGIN
    assert note == ("qwen3: no family plugin claims it; generic causal-LM route "
                    "(AutoModelForCausalLM, Qwen3ForCausalLM, plugin "
                    "plugtune.default_plugins.causal_lm)")


def test_image_text_without_the_vision_plugin_says_install_it():
    with pytest.raises(UnknownModelError, match="pip install plugtune-vision"):
        route_model(_core_pm(), "qwen3_vl", AutoConfig.for_model("qwen3_vl"))


def test_encoder_only_is_refused_through_the_router():
    with pytest.raises(UnknownModelError, match="encoder-only.*Installed families"):
        route_model(_core_pm(), "bert", AutoConfig.for_model("bert"))


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,kw,exact,named", [
    ("qwen3", {}, True, "softmax"),
    ("gemma3_text", {}, True, "sliding_attention"),
    ("qwen3_5_text", {}, False, "'linear_attention'"),
    ("qwen3_next", {}, False, "'linear_attention'"),
    ("lfm2", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]), False, "'conv'"),
    ("falcon_h1", {}, False, "'hybrid'"),
    ("jamba", {}, False, "'linear_attention'"),
    ("bamba", {}, False, "'linear_attention'"),
    ("granitemoehybrid", {}, False, "'linear_attention'"),
    ("nemotron_h", {}, False, "'linear_attention'"),
    ("zamba", {}, False, "'hybrid'"),
    ("mamba", {}, False, "'linear_attention'"),
    ("rwkv", {}, False, "RWKV"),
    ("gpt_oss", {}, True, "plugtune builds them with position_ids"),
    ("bloom", {}, False, "without position_ids"),
])
def test_packing_verdict_from_the_config(model_type, kw, exact, named):
    verdict = packing_support(AutoConfig.for_model(model_type, **kw))
    assert verdict.exact is exact and named in verdict.reason, verdict.reason


def test_family_packing_overrides_the_config():
    cfg = AutoConfig.for_model("qwen3_5_text")
    assert packing_support(cfg, Family("q", ("x",), packing="exact")).exact
    refused = packing_support(AutoConfig.for_model("qwen3"),
                              Family("q", ("x",), packing="refused", packing_reason="because"))
    assert (refused.exact, refused.reason, refused.source) == (False, "because", "family")


@pytest.mark.parametrize("model_type,sees", [("qwen3", True), ("gemma3_text", True),
                                             ("mistral", True), ("gpt_oss", False),
                                             ("bloom", False)])
def test_mask_builders_get_position_ids(model_type, sees):
    """Read from the model's source; ``test_contract`` measures the consequence (gpt_oss
    |Δlogit| ~0.5 packed vs alone)."""
    assert mask_sees_position_ids(AutoConfig.for_model(model_type)) is sees


def test_install_packed_masks_makes_gpt_oss_exact():
    """gpt_oss builds its masks without position_ids: packed samples leak (|Δ| ~0.5) until
    plugtune hands it masks built with them."""
    import torch
    from transformers import AutoModelForCausalLM

    from plugtune.architectures import install_packed_masks
    from plugtune.testing.architectures import COMMON, TINY, packed_logit_gap

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", **{**COMMON, **TINY["gpt_oss"][1], "vocab_size": 300,
                                            "pad_token_id": 0, "eos_token_id": 1})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    samples = [list(range(10, 21)), list(range(40, 49))]
    assert packed_logit_gap(model, samples) > 1e-2
    assert install_packed_masks(model)
    assert packed_logit_gap(model, samples) <= 1e-5
    tiny_qwen3 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3", **{**COMMON, "vocab_size": 300}))
    assert not install_packed_masks(tiny_qwen3)  # its forward passes position_ids itself


def _tiny_dir(tmp_path, model_type, **kw):
    from plugtune.testing.architectures import save_tiny

    return save_tiny(model_type, tmp_path / model_type, **kw)


def test_refused_packing_stops_before_the_model_loads(tmp_path, monkeypatch):
    from plugtune import modeling
    from plugtune.config import validate_recipe
    from plugtune.train import TrainingError, build_spec, prepare_run

    base = _tiny_dir(tmp_path, "lfm2")
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rec = validate_recipe({"base_model": str(base), "sample_packing": True,
                           "datasets": [{"path": "x.jsonl", "type": "alpaca"}]})
    with pytest.raises(TrainingError, match=r"sample_packing: true is refused for lfm2: layer "
                                            r"kinds 'conv' .*Set sample_packing: false"):
        prepare_run(rec, _core_pm())
    spec = build_spec(rec, _core_pm())  # merge / generate of a run are not refused
    assert (spec.model_type, spec.family.name) == ("lfm2", "causal_lm")
    assert spec.extra["route_note"].startswith("lfm2: no family plugin claims it")


# --- attention ---------------------------------------------------------------------------------


def test_attention_falls_back_to_what_the_class_supports():
    impl, notice = supported_attention(AutoConfig.for_model("gpt_oss"), "sdpa")
    assert impl == "eager" and "GptOssForCausalLM does not support sdpa" in notice
    assert supported_attention(AutoConfig.for_model("qwen3"), "sdpa") == ("sdpa", "")


def test_load_uses_the_fallback_with_one_notice(tmp_path, caplog):
    from plugtune.modeling import attn_implementation
    from plugtune.testing import make_spec

    spec, _ = make_spec("causal_lm", pm=_core_pm())
    spec.hf_config = AutoConfig.for_model("gpt_oss")
    with caplog.at_level("WARNING"):
        assert attn_implementation(spec) == "eager"
    assert sum("does not support sdpa" in r.getMessage() for r in caplog.records) == 1
    fam = spec.replace(family=Family("x", ("x",), attn_implementation="eager"),
                       hf_config=AutoConfig.for_model("qwen3"))
    assert attn_implementation(fam) == "eager"


# --- plugtune families ---------------------------------------------------------------------------


def test_families_cli_lists_routes_packing_attention_and_tests(capsys):
    from plugtune.cli import main

    assert main(["families", "--json"]) == 0
    rows = {r["model_type"]: r for r in json.loads(capsys.readouterr().out)}
    for mt in CONTRACT_TYPES:
        assert rows[mt]["route"], mt
        assert rows[mt]["test"].endswith(f"test_contract[{mt}]")
    assert rows["qwen3_5_text"]["packing"] == "refused" and "linear_attention" in \
        rows["qwen3_5_text"]["packing_reason"]
    assert rows["gpt_oss"]["attn_implementation"] == "eager"
    assert rows["qwen3"]["packing"] == "exact"
    assert main(["families"]) == 0
    assert "qwen3_5_text" in capsys.readouterr().out
