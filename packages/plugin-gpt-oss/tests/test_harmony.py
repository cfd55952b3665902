"""The harmony chat format on a real tokenizer: rendering, per-turn labels (reasoning in the
analysis channel of the last turn only), reasoning_effort, generation stops."""

from __future__ import annotations

import pytest

from plugtune.config import RecipeError, validate_recipe
from plugtune.data.formats import messages as messages_format
from plugtune.data.formats import template_messages
from plugtune.data.tokenize import TemplateRenderError, probe_template, tokenize_chat
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


def _spans(tok, msgs):
    """Trained spans (decoded) of each row :class:`HarmonyRows` makes of ``msgs``, and the rows'
    texts (without the stand-in tokenizer's BOS: gpt-oss's own adds none)."""
    info = probe_template(tok)
    assert info.end_of_turn == "<|end|>"
    spans, texts = [], []
    for conv in harmony.HarmonyRows()(tok, msgs, None):
        row = tokenize_chat(tok, conv, info, 512)
        spans.append([tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])])
        texts.append(tok.decode(row["input_ids"]).removeprefix(tok.bos_token))
        assert texts[-1] == tok.apply_chat_template(conv, tokenize=False)
    return spans, texts


def _record(key, first_reasoning):
    first = {"role": "assistant", "content": "Paris."}
    if first_reasoning:
        first[key] = "France's capital is Paris."
    return {"messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"}, first,
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", key: "Italy's capital is Rome."}]}


ROME = ("<|channel|>analysis<|message|>Italy's capital is Rome.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Rome.<|end|>")


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_trained_labels_are_what_the_template_renders(harmony_tok, key):
    """Reasoning on the last turn only (read from each data key): one row; turn 1's labels
    decode to exactly its final message, turn 2's to its analysis + final messages."""
    msgs, _ = template_messages(messages_format(_record(key, False), {}))
    spans, texts = _spans(harmony_tok, msgs)
    assert spans == [["<|channel|>final<|message|>Paris.<|end|>", ROME]]
    assert texts[0].count("<|start|>assistant") == 3  # turn 1, analysis and final of turn 2


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
def test_earlier_reasoning_is_trained_in_its_own_row(harmony_tok, key):
    """Reasoning on both turns: harmony drops turn 1's reasoning from the history, so turn 1 is
    trained (with its analysis) in a row that ends with it, and the whole conversation row
    trains turn 2 with turn 1 as context, its reasoning absent."""
    msgs, _ = template_messages(messages_format(_record(key, True), {}))
    with pytest.raises(TemplateRenderError):  # why the rows: one row cannot hold both turns
        tokenize_chat(harmony_tok, msgs, probe_template(harmony_tok), 512)
    spans, texts = _spans(harmony_tok, msgs)
    assert spans == [["<|channel|>analysis<|message|>France's capital is Paris.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>Paris.<|end|>"], [ROME]]
    assert "France's capital" not in texts[1]
    assert texts[1].startswith(texts[0].removesuffix(
        "<|start|>assistant<|channel|>analysis<|message|>France's capital is Paris.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|end|>"))


def test_rows_with_another_template_train_each_turn_as_last(harmony_tok):
    """A template other than plugtune's (the checkpoint's own ends the last turn differently):
    every earlier trained turn gets its own row; untrained turns get none."""
    harmony_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "train": False},
            {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]
    rows = harmony.HarmonyRows()(harmony_tok, msgs, None)
    assert [len(r) for r in rows] == [2, 6]
    assert [m.get("train") for m in rows[1] if m["role"] == "assistant"] == [False, False, None]


def test_reasoning_that_is_not_a_string_is_a_clear_error():
    from plugtune.data.formats import BadRecord

    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "thinking": ["a", "b"]}]}
    with pytest.raises(BadRecord, match=r"messages\[1\]\.thinking.: expected a string"):
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
