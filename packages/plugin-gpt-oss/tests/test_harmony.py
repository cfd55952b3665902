"""The harmony chat format on a real tokenizer: rendering, per-turn labels (reasoning in the
analysis channel of the last turn only), reasoning_effort, generation stops."""

from __future__ import annotations

import pytest

from plugtune.config import RecipeError, validate_recipe
from plugtune.data.formats import messages as messages_format
from plugtune.data.formats import template_messages
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.testing import force_next_token, make_spec, trained_spans
from plugtune_gpt_oss import harmony

SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\n\nReasoning: {effort}\n\n# Valid channels: analysis, "
          "commentary, final. Channel must be included for every message.<|end|>")


def test_renders_the_harmony_layout(harmony_tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two."}]
    full = harmony_tok.apply_chat_template(msgs, tokenize=False)
    prompt = harmony_tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    head = (SYSTEM.format(effort="medium")
            + "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
            + "<|start|>user<|message|>2+2?<|end|>")
    assert prompt == head + "<|start|>assistant"
    assert full == head + ("<|start|>assistant<|channel|>analysis<|message|>Two plus two.<|end|>"
                           "<|start|>assistant<|channel|>final<|message|>4.<|end|>")
    # every harmony marker is one token
    for t in harmony.SPECIAL_TOKENS:
        assert len(harmony_tok(t, add_special_tokens=False)["input_ids"]) == 1, t


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_trained_labels_are_what_the_template_renders(harmony_tok, key):
    """Two answered turns, reasoning given on both: labels of turn 1 decode to exactly its final
    message, labels of turn 2 to its analysis + final messages; turn 1's reasoning is dropped
    (harmony keeps no earlier reasoning) and so is absent from the input ids too."""
    rec = {"messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", key: "EARLIER REASONING"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", key: "Italy's capital is Rome."}]}
    msgs, _ = template_messages(messages_format(rec, {}))
    info = probe_template(harmony_tok)
    assert info.end_of_turn == "<|end|>"
    row = tokenize_chat(harmony_tok, msgs, info, 512)
    spans = [harmony_tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])]
    assert spans == ["<|channel|>final<|message|>Paris.<|end|>",
                     "<|channel|>analysis<|message|>Italy's capital is Rome.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>Rome.<|end|>"]
    # the stand-in tokenizer adds Llama 3's BOS (gpt-oss's own adds none)
    text = harmony_tok.decode(row["input_ids"]).removeprefix(harmony_tok.bos_token)
    assert "EARLIER REASONING" not in text
    assert text == harmony_tok.apply_chat_template(msgs, tokenize=False)
    assert text.count("<|start|>assistant") == 3  # turn 1, analysis and final of turn 2


def test_reasoning_that_is_not_a_string_is_a_clear_error():
    from plugtune.data.formats import BadRecord

    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "thinking": ["a", "b"]}]}
    with pytest.raises(BadRecord, match=r"messages\[1\]\.thinking.*string"):
        messages_format(rec, {})


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_in_the_system_message(harmony_tok, effort):
    rec = validate_recipe({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "messages"}],
                           "reasoning_effort": effort})
    assert rec.reasoning_effort == effort
    harmony_tok.chat_template = harmony.harmony_template(rec.reasoning_effort)
    out = harmony_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert out.startswith(SYSTEM.format(effort=effort))


def test_bad_reasoning_effort_names_the_key():
    with pytest.raises(RecipeError, match="reasoning_effort"):
        validate_recipe({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "messages"}],
                         "reasoning_effort": "max"})
    with pytest.raises(ValueError, match="reasoning_effort"):
        harmony.harmony_template("max")


def test_template_kept_when_the_tokenizer_ships_one(harmony_tok):
    harmony_tok.chat_template = "{{ 'own' }}"
    harmony.install_template(harmony_tok)
    assert harmony_tok.chat_template == "{{ 'own' }}"
    harmony.install_template(harmony_tok, force=True)
    assert harmony_tok.chat_template == harmony.HARMONY


@pytest.mark.parametrize("token,stops", [("<|return|>", True), ("<|call|>", True),
                                         ("<|end|>", True), (" Paris", False)])
def test_generation_stops_at_harmony_end_tokens(tiny_dir, pm, token, stops):
    spec, pm = make_spec("gpt_oss", path=str(tiny_dir), pm=pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    tok = loaded.tokenizer
    ids = tok(token, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    model = force_next_token(loaded.model, ids[0])
    assert set(harmony.stop_ids(tok)) <= set(model.generation_config.eos_token_id)
    out = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=["Hi"],
                                    max_new_tokens=3, images=None)
    assert out == ([""] if stops else ["Paris Paris Paris"])
