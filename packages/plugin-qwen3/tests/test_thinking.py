"""Hybrid thinking on the real Qwen3 tokenizer: every trained turn's labels are exactly what the
chat template renders for that turn when it is generated (computed here independently with
``apply_chat_template``), with and without ``enable_thinking``, in both data layouts."""

from __future__ import annotations

import json

import pytest

from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.modeling import prompt_texts
from plugtune.testing import make_spec, trained_spans
from plugtune_qwen3._thinking import ThinkingRows, set_thinking_default

EOT = "<|im_end|>"
TOOL_CALL = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]

#: conversations: ("user" | "system" | "tool", text) or ("assistant", reasoning | None, answer
#: [, tool_calls]); expected row count per enable_thinking (None, False) from Qwen3's template
CASES = {
    "two_questions": ([("user", "What is 2+2?"), ("assistant", "Add the two numbers.", "4"),
                       ("user", "And 3+3?"), ("assistant", "Add again.", "6")], (2, 2)),
    "mixed_reasoning": ([("system", "Be brief."), ("user", "Hi"), ("assistant", None, "Hello!"),
                         ("user", "Capital of France?"),
                         ("assistant", "Recall geography.", "Paris."),
                         ("user", "Thanks"), ("assistant", None, "You're welcome.")], (3, 3)),
    # a tool call after the last user turn keeps its reasoning later: one row when thinking
    "tool_steps": ([("user", "Weather in Paris?"),
                    ("assistant", "Call the weather tool.", "", TOOL_CALL),
                    ("tool", "18C and sunny"),
                    ("assistant", "Read the result.", "18 degrees and sunny.")], (1, 2)),
}


def messages(case: list[tuple], layout: str, keep_reasoning: bool = True) -> list[dict]:
    """The conversation as messages: reasoning in ``reasoning_content`` (``field``) or as a
    ``<think>`` block leading ``content`` (``inline``); ``keep_reasoning=False`` drops it."""
    out = []
    for turn in case:
        if turn[0] != "assistant":
            out.append({"role": turn[0], "content": turn[1]})
            continue
        reasoning, answer = turn[1], turn[2]
        m = {"role": "assistant", "content": answer}
        if reasoning is not None and keep_reasoning:
            if layout == "field":
                m["reasoning_content"] = reasoning
            else:
                m["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        if len(turn) > 3:
            m["tool_calls"] = turn[3]
        out.append(m)
    return out


def expected_turns(tok, msgs: list[dict], **kw) -> list[str]:
    """What the template renders for each assistant turn when it is the one generated:
    ``render(msgs[:k+1])`` minus ``render(msgs[:k], add_generation_prompt=True)``, up to and
    including the end-of-turn token."""
    out = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True, **kw)
        full = tok.apply_chat_template(msgs[: k + 1], tokenize=False, **kw)
        assert full.startswith(prompt)
        resp = full[len(prompt):]
        out.append(resp[: resp.rindex(EOT) + len(EOT)])
    return out


def trained_texts(tok, msgs: list[dict], enable_thinking):
    """``(trained spans decoded, rows)`` through the plugin's rows and core's tokenizer."""
    set_thinking_default(tok, enable_thinking)
    info = probe_template(tok)
    rows = ThinkingRows(enable_thinking)(tok, msgs, None)
    spans, encoded = [], []
    for row in rows:
        enc = tokenize_chat(tok, row, info, 2048)
        assert enc["status"] == "kept"
        spans += [tok.decode(s) for s in trained_spans(enc["input_ids"], enc["labels"])]
        encoded.append((row, enc))
    return spans, encoded


@pytest.mark.parametrize("enable_thinking", [None, False])
@pytest.mark.parametrize("layout", ["field", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_multi_turn_labels_are_what_the_template_renders(qwen3_tok, case, layout, enable_thinking):
    from plugtune.testing import load_shared_tokenizer

    turns, n_rows = CASES[case]
    msgs = messages(turns, layout)
    spans, rows = trained_texts(qwen3_tok, msgs, enable_thinking)
    ref = load_shared_tokenizer("qwen3")  # untouched template: the independent reference
    if enable_thinking is False:
        want = expected_turns(ref, messages(turns, layout, keep_reasoning=False),
                              enable_thinking=False)
    else:
        want = expected_turns(ref, msgs)
    assert spans == want
    assert len(rows) == n_rows[enable_thinking is False]
    if enable_thinking is None:  # each row's text is the template's rendering of its messages
        for row, enc in rows:
            ref_row = [{k: v for k, v in m.items() if k != "train"} for m in row]
            assert qwen3_tok.decode(enc["input_ids"]) == ref.apply_chat_template(ref_row, tokenize=False)


def test_enable_thinking_false_trains_answers_only(qwen3_tok):
    turns = CASES["mixed_reasoning"][0]
    spans, rows = trained_texts(qwen3_tok, messages(turns, "field"), False)
    assert spans == ["Hello!" + EOT, "Paris." + EOT, "You're welcome." + EOT]
    for _row, enc in rows:  # the empty block sits in the prompt, before each trained answer
        text = qwen3_tok.decode(enc["input_ids"])
        assert text.count("<think>\n\n</think>\n\n") == 1 and "Recall geography" not in text


def test_enable_thinking_unset_trains_the_empty_block(qwen3_tok):
    spans, _ = trained_texts(qwen3_tok, messages(CASES["mixed_reasoning"][0], "inline"), None)
    assert spans[0] == "<think>\n\n</think>\n\nHello!" + EOT
    assert spans[1] == "<think>\nRecall geography.\n</think>\n\nParis." + EOT


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_generation_prompt_honours_enable_thinking(qwen3_tok, enable_thinking):
    from plugtune.testing import load_shared_tokenizer

    spec, pm = make_spec("qwen3", enable_thinking=enable_thinking)
    assert spec.plugin.startswith("plugtune") and spec.family.name == "qwen3"
    assert pm.hook.plugtune_chat_rows(spec=spec, tokenizer=qwen3_tok) == ThinkingRows(enable_thinking)
    msgs = [{"role": "user", "content": "Hi"}]
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    want = load_shared_tokenizer("qwen3").apply_chat_template(msgs, tokenize=False,
                                                              add_generation_prompt=True, **kw)
    assert prompt_texts(qwen3_tok, [msgs]) == [want]  # what core's generation renders
    assert want.endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)
    # an explicit argument still wins over the default; setting it again does not stack
    set_thinking_default(qwen3_tok, enable_thinking)
    assert qwen3_tok.chat_template.count("plugtune: enable_thinking") == (enable_thinking is not None)
    on = qwen3_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=True)
    assert not on.endswith("</think>\n\n")


#: a template of SmolLM3's shape (written for this test): reasoning only inline in ``content``,
#: an empty block before each answer and in the generation prompt when thinking is off
SMOL_LIKE = (
    "{%- if enable_thinking is not defined %}{%- set enable_thinking = true %}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{%- if not enable_thinking %}{{ '<think>\n\n</think>\n' }}{%- endif %}"
    "{{ m.content + '<|im_end|>\n' }}{%- else %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if not enable_thinking %}{{ '<think>\n\n</think>\n' }}{%- endif %}{%- endif %}")


@pytest.mark.parametrize("enable_thinking,want", [
    (None, ["<think>\nAdd the two numbers.\n</think>\n4" + EOT, "<think>\nAdd again.\n</think>\n6" + EOT]),
    (False, ["4" + EOT, "6" + EOT]),
])
def test_template_without_reasoning_field(qwen3_tok, enable_thinking, want):
    """SmolLM3-style: ``reasoning_content`` is written inline; history is never rewritten, so
    the conversation stays one row."""
    qwen3_tok.chat_template = SMOL_LIKE
    spans, rows = trained_texts(qwen3_tok, messages(CASES["two_questions"][0], "field"),
                                enable_thinking)
    assert spans == want and len(rows) == 1


def test_reasoning_content_survives_the_data_pipeline(qwen3_tok, tmp_path):
    from plugtune.config import validate_recipe
    from plugtune.data import DataError
    from plugtune.data.pipeline import prepare

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages(CASES["two_questions"][0], "field")}) + "\n")
    rec = validate_recipe({"base_model": "tiny", "datasets": [{"path": str(path), "type": "messages"}],
                           "sequence_len": 256})
    data = prepare(rec, qwen3_tok, "causal", chat_rows=ThinkingRows(None))
    assert data.stats["rows"] == 2
    labels = [qwen3_tok.decode([t for t in r["labels"] if t != -100]) for r in data.train]
    assert labels == ["<think>\nAdd the two numbers.\n</think>\n\n4" + EOT,
                      "<think>\nAdd again.\n</think>\n\n6" + EOT]
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}]
    path.write_text(json.dumps({"messages": bad}) + "\n")
    with pytest.raises(DataError, match=r"reasoning_content.*expected a string"):
        prepare(rec, qwen3_tok, "causal", chat_rows=ThinkingRows(None))
