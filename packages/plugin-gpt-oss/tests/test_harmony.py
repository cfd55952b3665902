"""The harmony chat format on a real tokenizer: rendering, per-turn labels (reasoning in the
analysis channel of the last turn only), reasoning_effort, generation stops."""

from __future__ import annotations

import pytest
import torch

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
                           "<|start|>assistant<|channel|>final<|message|>4.<|return|>")
    # in a history: no reasoning, the answer closed by <|end|>
    later = harmony_tok.apply_chat_template([*msgs, {"role": "user", "content": "3+3?"}],
                                            tokenize=False, add_generation_prompt=True)
    assert later == head + ("<|start|>assistant<|channel|>final<|message|>4.<|end|>"
                            "<|start|>user<|message|>3+3?<|end|><|start|>assistant")
    # every harmony marker is one token
    for t in harmony.SPECIAL_TOKENS:
        assert len(harmony_tok(t, add_special_tokens=False)["input_ids"]) == 1, t


def _spans(tok, msgs):
    """Trained spans (decoded) of each row :class:`HarmonyRows` makes of ``msgs``, and the rows'
    texts (without the stand-in tokenizer's BOS: gpt-oss's own adds none)."""
    info = probe_template(tok)
    assert info.end_of_turn == "<|return|>"
    spans, texts = [], []
    for conv in harmony.HarmonyRows()(tok, msgs, None):
        row = tokenize_chat(tok, conv, info, 512)
        spans.append([tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])])
        texts.append(tok.decode(row["input_ids"]).removeprefix(tok.bos_token))
    return spans, texts


def _core_folds_context_turns() -> bool:
    """Whether core tokenizes rows whose context turns render differently later (the
    ``plugtune_chat_rows`` hook and its folding arrived together)."""
    from plugtune import hookspecs

    return hasattr(hookspecs, "plugtune_chat_rows")


def _turn(content, key=None, reasoning=None):
    m = {"role": "assistant", "content": content}
    if reasoning:
        m[key] = reasoning
    return m


PARIS = ("<|channel|>analysis<|message|>France's capital is Paris.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>")
ROME = ("<|channel|>analysis<|message|>Italy's capital is Rome.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Rome.<|return|>")


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_trained_labels_are_what_the_template_renders(harmony_tok, key):
    """One turn, its reasoning under each data key: the labels decode to exactly the analysis
    and final messages the template renders, the answer closed by <|return|>."""
    rec = {"messages": [{"role": "developer", "content": "Answer briefly."},
                        {"role": "user", "content": "Capital of France?"},
                        _turn("Paris.", key, "France's capital is Paris.")]}
    msgs, _ = template_messages(messages_format(rec, {}))
    spans, texts = _spans(harmony_tok, msgs)
    assert spans == [[PARIS]]
    assert texts[0] == harmony_tok.apply_chat_template(msgs, tokenize=False)


@pytest.mark.skipif(not _core_folds_context_turns(), reason="core without plugtune_chat_rows")
@pytest.mark.parametrize("first_reasoning", [True, False])
def test_every_turn_is_trained_as_when_it_is_generated(harmony_tok, first_reasoning):
    """Two answered turns: turn 1 is trained in its own row as it is generated (its analysis,
    <|return|>); the whole-conversation row trains turn 2 with turn 1 as history (no reasoning,
    <|end|>). One row could not hold both (core refuses it)."""
    rec = {"messages": [{"role": "user", "content": "Capital of France?"},
                        _turn("Paris.", "thinking", "France's capital is Paris." if first_reasoning else None),
                        {"role": "user", "content": "And of Italy?"},
                        _turn("Rome.", "thinking", "Italy's capital is Rome.")]}
    msgs, _ = template_messages(messages_format(rec, {}))
    with pytest.raises(TemplateRenderError):
        tokenize_chat(harmony_tok, msgs, probe_template(harmony_tok), 512)
    spans, texts = _spans(harmony_tok, msgs)
    first = PARIS if first_reasoning else "<|channel|>final<|message|>Paris.<|return|>"
    assert spans == [[first], [ROME]]
    assert "France's capital" not in texts[1]
    assert "<|channel|>final<|message|>Paris.<|end|><|start|>user" in texts[1]


def test_rows_train_each_earlier_turn_in_its_own_row(harmony_tok):
    """Row structure: an earlier trained turn ends a row of its own; untrained turns get none;
    the last row holds every earlier turn as context; reasoning stays on each row's last turn."""
    msgs = [{"role": "user", "content": "a"}, _turn("b", "reasoning_content", "rb"),
            {"role": "user", "content": "c"}, {**_turn("d"), "train": False},
            {"role": "user", "content": "e"}, _turn("f", "reasoning_content", "rf")]
    rows = harmony.HarmonyRows()(harmony_tok, msgs, None)
    assert [len(r) for r in rows] == [2, 6]
    assert rows[0][-1] == msgs[1]
    assert [m.get("train") for m in rows[1] if m["role"] == "assistant"] == [False, False, None]
    assert [m.get("reasoning_content") for m in rows[1] if m["role"] == "assistant"] == [
        None, None, "rf"]
    assert harmony.HarmonyRows()(harmony_tok, msgs[:2], None) == [msgs[:2]]


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
                                         ("<|end|>", False), (" Paris", False)])
def test_generation_stops_at_harmony_end_tokens(tiny_dir, pm, token, stops):
    """<|return|> and <|call|> end a response; <|end|> does not (it also closes the analysis
    message before the answer), nor does text."""
    spec, pm = make_spec("gpt_oss", path=str(tiny_dir), pm=pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    tok = loaded.tokenizer
    ids = tok(token, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    assert (ids[0] in loaded.model.generation_config.eos_token_id) == stops
    model = force_next_token(loaded.model, ids[0])
    out = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=["Hi"],
                                    max_new_tokens=3, images=None)
    assert out == ["Paris Paris Paris" if token == " Paris" else ""]
    gen = model.generate(**tok(["Hi"], return_tensors="pt"), max_new_tokens=3,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] - 1 - tok("Hi", return_tensors="pt")["input_ids"].shape[1] == (
        0 if stops else 2)


@pytest.mark.parametrize("raw,answer", [
    ("<|channel|>final<|message|>Paris.<|return|>", "Paris."),
    ("<|channel|>final<|message|>Paris.<|end|><|start|>assistant<|channel|>final", "Paris."),
    ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>"
     "Paris.<|return|><|eot_id|><|eot_id|>", "Paris."),
    ("<|channel|>final<|message|> Paris. <|end|>", "Paris."),
    ("<|channel|>analysis<|message|>Still thinking", ""),  # cut off before the answer
    ("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>", ""),
    ("Paris Paris<|eot_id|>", "Paris Paris"),  # no harmony at all
])
def test_final_text_is_the_answer(harmony_tok, raw, answer):
    assert harmony.final_text_parser(harmony_tok)(raw) == answer


def test_generate_returns_the_final_channel(tiny_dir, pm):
    """A scripted harmony response (analysis, then final) through core's generate with the
    plugin's decoding: the answer only; a control with core's default decoding shows why."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from plugtune.modeling import generate_causal

    spec, pm = make_spec("gpt_oss", path=str(tiny_dir), pm=pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    tok, model = loaded.tokenizer, loaded.model
    script = tok("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
                 "<|message|>Paris.<|return|>", add_special_tokens=False)["input_ids"]

    class Scripted(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            out = torch.full_like(scores, -1e9)
            out[:, script[min(step, len(script) - 1)]] = 0.0
            return out

    prompt_len = len(tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                 tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]) + int(tok.bos_token is not None)
    kw = dict(extra_stop_tokens=harmony.STOP_TOKENS, logits_processor=LogitsProcessorList([Scripted()]))
    got = generate_causal(model, tok, ["Hi"], 40, skip_special_tokens=False,
                          postprocess=harmony.final_text_parser(tok), **kw)
    plain = generate_causal(model, tok, ["Hi"], 40, **kw)
    assert got == ["Paris."]
    assert plain == ["analysisThink.assistantfinalParis."]
