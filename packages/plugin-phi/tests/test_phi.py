"""Phi-3 quirks: fused target names, all-linear, training + merge == adapter, <|end|> labels and
generation stops, on tiny Phi-3 / Phi-4-mini models with the Phi-3 vocabulary."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from plugtune.config import validate_recipe
from plugtune.data.tokenize import TemplateRenderError, probe_template, tokenize_chat
from plugtune.plugins import UnknownModelError, resolve_family
from plugtune.testing import force_next_token, make_spec, trained_spans
from plugtune_phi import _fused
from plugtune_phi.plugin import FAMILY
from plugtune_phi.tiny import tiny_config

TWO_TURNS = [{"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"},
             {"role": "assistant", "content": "Rome."}]


#: templates with the layouts of Phi-3-mini (newlines) and Phi-4-mini (none), EOS after the last
#: message included (written for the tests from the format: <|role|> text <|end|>)
PHI3_MINI_LIKE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_MINI_LIKE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)


def _model(variant="phi3"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(400, variant, bos_token_id=1, eos_token_id=2))


def test_claims_phi3_only(pm):
    assert resolve_family(pm, "phi3").family == FAMILY
    for other in ("phimoe", "phi4_multimodal"):
        with pytest.raises(UnknownModelError):
            resolve_family(pm, other)
    # why phimoe is not claimed: its attention is not fused
    from transformers import PhimoeConfig

    moe = AutoModelForCausalLM.from_config(PhimoeConfig(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    assert {"q_proj", "k_proj", "v_proj"} <= _fused.leaf_names(moe)
    assert "qkv_proj" not in _fused.leaf_names(moe)


@pytest.mark.parametrize("asked,expected,mapped", [
    (["q_proj", "v_proj"], ["qkv_proj"], "q_proj, v_proj -> qkv_proj"),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "gate_proj, up_proj -> gate_up_proj"),
    ("q_proj,v_proj", ["qkv_proj"], "q_proj, v_proj -> qkv_proj"),
    ("up_proj", ["gate_up_proj"], "up_proj -> gate_up_proj"),
    (["qkv_proj", "o_proj"], ["qkv_proj", "o_proj"], None),
    ("auto", ["qkv_proj"], None),
])
@pytest.mark.parametrize("variant", ["phi3", "phi4_mini"])
def test_llama_names_map_to_fused_layers(pm, caplog, variant, asked, expected, mapped):
    spec, pm = make_spec("phi3", pm=pm)
    with caplog.at_level(logging.WARNING, logger="plugtune_phi.plugin"):
        got = pm.hook.plugtune_target_modules(spec=spec, model=_model(variant), method=asked)
    assert got == expected
    notices = [r.getMessage() for r in caplog.records if r.name == "plugtune_phi.plugin"]
    if mapped is None:
        assert notices == []
    else:
        assert len(notices) == 1 and mapped in notices[0]


@pytest.mark.parametrize("asked,match", [
    (["q_proj", "nope"], "nope"),
    (["mlp"], "not layers LoRA can wrap"),
    (r".*\.q_proj", "matches no module"),
])
def test_targets_that_match_nothing_are_errors(pm, asked, match):
    spec, pm = make_spec("phi3", pm=pm)
    with pytest.raises(ValueError, match=match):
        pm.hook.plugtune_target_modules(spec=spec, model=_model(), method=asked)


def test_regex_targets_pass_through(pm):
    spec, pm = make_spec("phi3", pm=pm)
    assert pm.hook.plugtune_target_modules(spec=spec, model=_model(),
                                           method=r".*\.qkv_proj") == r".*\.qkv_proj"


def test_all_linear_includes_the_fused_layers(pm):
    spec, pm = make_spec("phi3", pm=pm)
    got = pm.hook.plugtune_target_modules(spec=spec, model=_model(), method="all-linear")
    assert got == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("variant", ["phi3", "phi4_mini"])
def test_trains_and_merge_matches_the_adapter(tiny_dirs, chat_jsonl, tmp_path, pm, variant):
    """2 LoRA steps with Llama-style target names through ``plugtune.train`` (packed), then
    ``plugtune.merge``: the merged model's logits equal base + adapter."""
    import json

    from peft import PeftModel

    from plugtune.merge import merge_run
    from plugtune.train import train

    torch.set_num_threads(1)
    rec = validate_recipe(dict(
        base_model=str(tiny_dirs[variant]), adapter="lora", lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        datasets=[dict(path=str(chat_jsonl), type="messages")], sample_packing=True,
        sequence_len=256, micro_batch_size=2, learning_rate=5e-2, max_steps=2, logging_steps=1,
        output_dir=str(tmp_path / "run")), pm=pm)
    run = train(rec, pm=pm).output_dir
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "qkv_proj"]
    out = merge_run(run, tmp_path / "merged", pm=pm)
    ids = torch.tensor([[1, 300, 301, 302, 50, 60, 70, 80, 32010, 32001]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[variant])
    plain = _logits(base, ids)
    ref = _logits(PeftModel.from_pretrained(base, str(run)), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out), ids)
    assert (ref - plain).abs().max() > 1e-3, "the adapter changes nothing; test is vacuous"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("template,tail", [(PHI3_MINI_LIKE, "<|assistant|>\nRome.<|end|>\n"),
                                           (PHI4_MINI_LIKE, "<|assistant|>Rome.<|end|>")])
def test_labels_end_with_end_of_turn(tiny_dirs, template, tail):
    """The tokenizer ships a Phi-3 / Phi-4-mini layout with an EOS after the last message: core
    cannot split its multi-turn renders; without that EOS every trained turn decodes to exactly
    the answer + <|end|>, and the rest of the template is unchanged."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["phi3"])
    tok.chat_template = template
    original = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    with pytest.raises(TemplateRenderError):
        tokenize_chat(tok, TWO_TURNS, probe_template(tok), 256)
    assert _fused.prefix_stable_template(tok)
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) + tok.eos_token == original
    assert original.endswith(tail + tok.eos_token)
    info = probe_template(tok)
    assert info.end_of_turn == "<|end|>"
    row = tokenize_chat(tok, TWO_TURNS, info, 256)
    spans = [tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])]
    assert spans == ["Paris.<|end|>", "Rome.<|end|>"]


def test_load_gives_a_template_and_a_pad_that_is_no_stop(tiny_dirs, pm):
    spec, pm = make_spec("phi3", path=str(tiny_dirs["phi3"]), pm=pm)
    tok = pm.hook.plugtune_load(spec=spec).tokenizer
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False).endswith(
        "<|assistant|>\nRome.<|end|>\n")
    assert tok.pad_token == "<unk>"


def test_a_template_of_another_layout_is_kept(phi_tok):
    phi_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not _fused.prefix_stable_template(phi_tok)
    assert phi_tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("token,stops", [("<|end|>", True), ("<|endoftext|>", True),
                                         ("<|assistant|>", True), ("▁Paris", False)])
def test_generation_stops_at_end_of_turn(tiny_dirs, pm, token, stops):
    spec, pm = make_spec("phi3", path=str(tiny_dirs["phi3"]), pm=pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    tok = loaded.tokenizer
    model = force_next_token(loaded.model, tok.convert_tokens_to_ids(token))
    out = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=["Hi"],
                                    max_new_tokens=3, images=None)
    assert out == ([""] if stops else ["Paris Paris Paris"])
