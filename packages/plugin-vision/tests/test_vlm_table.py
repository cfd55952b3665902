"""Today's VLMs, one table: Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM and (no family row, the
generic ``image_text`` route) LLaVA and LLaVA-NeXT.

Per row, on a tiny random model from transformers' config classes, its real (or nearest real)
tokenizer and the real images of ../shared/data: encoding masks labels (trained tokens decode
to exactly the responses + end of turn; every image token and the prompt is -100), the
collated pixels go through the model's forward, LoRA trains 2 steps through
``plugtune.train.train``, and generation stops at the template's end of turn.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import GENERIC_ONLY, TABLE, caption_image, demo_image, tokenizer_for

from plugtune.data.tokenize import IGNORE_INDEX, probe_template
from plugtune.testing import make_spec, shared_path

#: model types with a family row; the others (LLaVA, LLaVA-NeXT) go through the generic route
SPECIFIC = [m for m in TABLE if m not in GENERIC_ONLY]
ANSWERS = ("They're Kane and Gretzka.\n\nBoth play for Bayern.", "They are celebrating.")


def _chat():
    return {"messages": [
        {"role": "user", "content": "<image>Who are they?"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "What are they doing?<image>"},
        {"role": "assistant", "content": ANSWERS[1]},
    ], "images": [demo_image("1.jpg"), demo_image("2.jpg")]}


def _route(model_type: str) -> str:
    return model_type if model_type in SPECIFIC else "image_text"


def _setup(model_type):
    from plugtune.data.templates import ensure_chat_template
    from plugtune_vision._processors import family_for
    from plugtune_vision.tiny import tiny_processor

    tok = tokenizer_for(model_type)
    proc = tiny_processor(model_type, tok)
    ensure_chat_template(tok, None)
    return tok, proc, family_for(model_type, proc)


def _in_expansion(row, tok, proc) -> list[bool]:
    """Which positions hold an image's special tokens (placeholder, pads, tile tags)."""
    special = set(tok.added_tokens_decoder)
    image_ids = set(proc.image_token_ids) | {
        t for t in tok(proc.image_token, add_special_tokens=False)["input_ids"]}
    for name in ("<start_of_image>", "<end_of_image>", "<|vision_start|>", "<|vision_end|>",
                 "<fake_token_around_image>", "<global-img>", "<row_1_col_1>"):
        tid = tok.convert_tokens_to_ids(name)
        if tid is not None and tid in special and tid != tok.unk_token_id:
            image_ids.add(tid)
    return [t in image_ids for t in row["input_ids"]]


@pytest.mark.parametrize("model_type", TABLE)
def test_encode_masks_labels(model_type):
    from plugtune_vision._encode import encode_example, with_placeholders
    from plugtune_vision._images import open_image

    tok, proc, fam = _setup(model_type)
    info = probe_template(tok)
    ex = _chat()
    row = encode_example(proc, tok, fam, ex, 4096, info)
    ids, labels = row["input_ids"], row["labels"]
    assert row["status"] == "kept" and row["images"] == ex["images"]
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels)), "labels are shifted"
    eot = info.end_of_turn or tok.eos_token
    # "\n\n" inside a response stays trained (Gemma has it as an added token, and it also
    # surrounds Gemma's image tokens: masking is by position, not by id)
    assert tok.decode(trained) == f"{ANSWERS[0]}{eot}{ANSWERS[1]}{eot}"
    is_img = _in_expansion(row, tok, proc)
    assert sum(is_img) > 2 * 3, "images were not expanded"
    assert not any(lab != IGNORE_INDEX for lab, img in zip(labels, is_img) if img)
    # the model's own processor gives the same ids for the same conversation
    text = tok.apply_chat_template(with_placeholders(ex["messages"], fam), tokenize=False)
    stock = proc(text=[text], images=[open_image(p) for p in ex["images"]],
                 add_special_tokens=False)["input_ids"][0]
    stock = stock.tolist() if hasattr(stock, "tolist") else list(stock)
    assert stock[:len(ids)] == ids
    if model_type == "gemma3":  # <bos> once, turns as Gemma's template renders them
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids[:3]) == "<bos><start_of_turn>user"
        assert eot == "<end_of_turn>"
    if model_type in GENERIC_ONLY:  # derived from the processor: no family row
        assert fam.placeholder == proc.image_token == "<image>"


def _scripted_head(model, tokens: list[int]):
    """Make greedy decoding emit ``tokens`` (then repeat the last): a forward hook on the
    output head adds a large logit to the scripted token at each generated step."""
    head = model.get_output_embeddings()
    step = {"n": 0}

    def hook(_mod, _inp, out):
        t = tokens[min(step["n"], len(tokens) - 1)]
        out = out.clone()
        out[:, -1, t] += 1e4
        step["n"] += 1
        return out

    return head.register_forward_hook(hook)


def _train(kind, tiny_dirs, tmp_path, **extra):
    from plugtune.config import validate_recipe
    from plugtune.train import train

    text_only = tmp_path / "text_only.json"
    text_only.write_text(json.dumps([{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]}]))
    recipe = validate_recipe({
        "base_model": tiny_dirs(kind), "output_dir": str(tmp_path / "run"),
        "datasets": [
            {"path": str(shared_path("vision", "skimage_clip_captions", "captions.json")),
             "type": "vision", "max_samples": 1},
            {"path": str(shared_path("llama_factory", "mllm_demo.json")), "type": "vision",
             "max_samples": 1},
            {"path": str(text_only), "type": "vision"}],
        "sequence_len": 1024, "micro_batch_size": 3, "max_steps": 2, "learning_rate": 1e-3,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "logging_steps": 1,
        "save_total_limit": 1, **extra})
    result = train(recipe)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert 0 < result.metrics["trainable_params"] < 0.1 * result.metrics["total_params"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    return result


@pytest.mark.parametrize("model_type", SPECIFIC)
def test_lora_trains_and_stops(model_type, tiny_dirs, tmp_path):
    from plugtune_vision.tiny import tiny_model

    _train(model_type, tiny_dirs, tmp_path)
    # generation: greedy "Paris" <end of turn> "junk"... must stop after "Paris"
    spec, pm = make_spec(model_type)
    tok, proc, _ = _setup(model_type)
    info = probe_template(tok)
    eot = tok.convert_tokens_to_ids(info.end_of_turn) if info.end_of_turn else tok.eos_token_id
    paris = tok("Paris", add_special_tokens=False)["input_ids"]
    junk = tok(" junk", add_special_tokens=False)["input_ids"][0]
    model = tiny_model(model_type, tok)
    handle = _scripted_head(model, [*paris, eot, junk])
    try:
        outs = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok,
                                         prompts=["<image>Where is this?"], max_new_tokens=8,
                                         images=[caption_image("rocket.jpg")], processor=proc)
    finally:
        handle.remove()
    assert outs == ["Paris"]


@pytest.mark.parametrize("model_type", [*GENERIC_ONLY, "qwen2_5_vl"])
def test_generic_route_trains(model_type, tiny_dirs, tmp_path, caplog):
    """``model_type: image_text`` (core routes unclaimed image-text types there): LLaVA and
    LLaVA-NeXT have no family row (facts from their processors); Qwen2.5-VL's row is found
    through its config."""
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec
    from plugtune_vision._processors import FAMILIES, family_for
    from plugtune_vision.tiny import tiny_model

    _train(model_type, tiny_dirs, tmp_path, model_type="image_text")
    assert "generic image-text route" in caplog.text
    spec = build_spec(result_recipe(tmp_path), get_plugin_manager())
    assert spec.family.name == "image_text" and spec.hf_config.model_type == model_type
    tok, proc, fam = _setup(model_type)
    assert fam == FAMILIES.get(model_type, family_for("image_text", proc))
    spec, pm = make_spec("image_text")
    model = tiny_model(model_type, tok)
    eot = tok.convert_tokens_to_ids(probe_template(tok).end_of_turn)
    handle = _scripted_head(model, [*tok("Paris", add_special_tokens=False)["input_ids"], eot, 11])
    try:
        outs = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok,
                                         prompts=["<image>Where?"], max_new_tokens=6,
                                         images=[caption_image("rocket.jpg")], processor=proc)
    finally:
        handle.remove()
    assert outs == ["Paris"]


def result_recipe(tmp_path):
    from plugtune.config import load_recipe

    return load_recipe(str(tmp_path / "run" / "recipe.yaml"), [])


def test_generic_route_refuses_a_processor_without_image_expansion():
    from plugtune.modeling import ModelLoadError
    from plugtune_vision._processors import derive_family

    class NoImage:
        image_token = None
        tokenizer = tokenizer_for("qwen2_5_vl")

    with pytest.raises(ModelLoadError, match="image_token=None"):
        derive_family(NoImage())


#: a chat template in SmolVLM's style, written for this test: it reads list content only
PARTS_ONLY = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def test_a_parts_only_chat_template_renders_string_content_as_parts():
    """SmolVLM's own template reads ``message['content']`` as a list of parts: plain strings
    would lose their text. The plugin prepends a preamble that turns strings into parts
    (``<image>`` -> an image part), so the rendering equals the model's own for list content
    and the labels train exactly the responses + ``<end_of_utterance>``."""
    from plugtune_vision._encode import encode_example
    from plugtune_vision._processors import FAMILIES, chat_template_for_strings

    tok, proc, fam = _setup("smolvlm")
    saved = tok.chat_template
    try:
        tok.chat_template = PARTS_ONLY
        assert "hi" not in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                   tokenize=False)
        assert "as parts" in chat_template_for_strings(proc, tok, FAMILIES["smolvlm"].placeholder)
        assert chat_template_for_strings(proc, tok, "<image>") is None  # idempotent
        as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Kane."}]}]
        as_string = [{"role": "user", "content": "<image>Who?"},
                     {"role": "assistant", "content": "Kane."}]
        assert (tok.apply_chat_template(as_string, tokenize=False)
                == tok.apply_chat_template(as_parts, tokenize=False)
                == "<|im_start|>User:<image>Who?<end_of_utterance>\nAssistant: Kane.<end_of_utterance>\n")
        info = probe_template(tok)
        assert info.end_of_turn == "<end_of_utterance>"
        row = encode_example(proc, tok, fam, _chat(), 4096, info)
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
        # the generation prompt ends "Assistant:" and the template writes ": " + the answer,
        # so each trained response starts with that space, as the model will generate it
        assert tok.decode(trained) == "".join(f" {a}<end_of_utterance>" for a in ANSWERS)
    finally:
        tok.chat_template = saved


def test_every_family_declares_packing_quirks_and_existing_tests():
    """``plugtune families`` lists these fields: each family of the plugin fills them, and
    each declared test exists."""
    from pathlib import Path

    from plugtune_vision.plugin import FAMILIES as CLAIMED

    root = Path(__file__).resolve().parents[3]
    for fam in CLAIMED:
        assert fam.quirks and fam.packing == "refused" and "never packed" in fam.packing_reason
        assert fam.tests, fam.name
        for test in fam.tests:
            path, name = test.split("::")
            assert f"def {name}(" in (root / path).read_text(), test
