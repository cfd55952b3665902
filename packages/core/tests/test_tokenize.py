"""Rendering, label masking, BOS/EOS and the length policy with the real tokenizers."""

from __future__ import annotations

import pytest

from plugtune.data.templates import TemplateError, ensure_chat_template
from plugtune.data.tokenize import (
    IGNORE_INDEX,
    apply_length_policy,
    probe_template,
    tokenize_chat,
    tokenize_seq2seq,
    tokenize_text,
)
from plugtune.testing import load_shared_tokenizer, trained_spans

ONE_TURN = [{"role": "user", "content": "Name a primary colour."},
            {"role": "assistant", "content": "Red is a primary colour."}]
MULTI = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "It is 4."}]

# (tokenizer, chat_template, expected end token of a response)
CASES = [
    ("llama2", "llama2", "</s>"),
    ("llama2", "alpaca", "</s>"),
    ("mistral_v1", "mistral", "</s>"),
    ("mistral_v1", "zephyr", "</s>"),
    ("llama3_2", None, "<|eot_id|>"),        # the tokenizer's own template
    ("qwen2_5", None, "<|im_end|>"),         # the tokenizer's own template
    ("falcon", "chatml", "<|im_end|>"),      # added special tokens
]


def _prep(name, template):
    tok = load_shared_tokenizer(name)
    ensure_chat_template(tok, template)
    return tok, probe_template(tok)


_trained_spans = trained_spans


@pytest.mark.parametrize("name,template,end", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_labels_are_exactly_each_response_plus_end_token(name, template, end):
    tok, info = _prep(name, template)
    assert tok.convert_tokens_to_ids(end) in info.stop_token_ids
    row = tokenize_chat(tok, MULTI, info, 4096)
    ids, labels = row["input_ids"], row["labels"]
    spans = _trained_spans(ids, labels)
    assert len(spans) == 2, "every assistant turn is trained, nothing else"
    for span, resp in zip(spans, ("Hello.", "It is 4.")):
        text = tok.decode(span, skip_special_tokens=False)
        assert text.strip().endswith(end)
        assert text.strip()[: -len(end)].strip() == resp
        assert span[-1] == tok.convert_tokens_to_ids(end)
    # exactly one BOS (when the tokenizer has one), at position 0
    if tok.bos_token_id is not None and (info.add_bos or info.bos_in_template):
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # the prompt text, including the user turns, is never trained
    prompt_only = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "What is 2+2?" in prompt_only and "You are terse." in prompt_only


@pytest.mark.parametrize("name,template,end", CASES[:3], ids=[f"{c[0]}-{c[1]}" for c in CASES[:3]])
def test_rendered_text_and_train_on_inputs(name, template, end):
    tok, info = _prep(name, template)
    row = tokenize_chat(tok, ONE_TURN, info, 4096)
    rendered = tok.decode(row["input_ids"])
    assert "Name a primary colour." in rendered and rendered.rstrip().endswith(end)
    full = tokenize_chat(tok, ONE_TURN, info, 4096, train_on_inputs=True)
    assert full["input_ids"] == row["input_ids"]
    assert sum(lab != IGNORE_INDEX for lab in full["labels"]) > sum(lab != IGNORE_INDEX for lab in row["labels"])


def test_eos_appended_when_template_emits_no_stop_token():
    tok = load_shared_tokenizer("llama2")
    ensure_chat_template(tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    info = probe_template(tok)
    row = tokenize_chat(tok, ONE_TURN, info, 4096)
    span = _trained_spans(row["input_ids"], row["labels"])[-1]
    assert span[-1] == tok.eos_token_id


def test_pad_equal_eos_keeps_eos_trained():
    tok, info = _prep("qwen2_5", None)
    tok.pad_token = tok.eos_token
    row = tokenize_chat(tok, ONE_TURN, info, 4096)
    from plugtune.data.collate import Collator

    batch = Collator(tok.pad_token_id)([row, tokenize_chat(tok, MULTI, info, 4096)])
    labels = batch["labels"][0]
    assert (labels == tok.convert_tokens_to_ids("<|im_end|>")).any()
    assert (labels[len(row["input_ids"]):] == IGNORE_INDEX).all()


def test_unknown_template_name_is_an_error():
    tok = load_shared_tokenizer("llama2")
    with pytest.raises(TemplateError, match="chatml"):
        ensure_chat_template(tok, "chatmll")
    with pytest.raises(TemplateError, match="ships no chat template"):
        ensure_chat_template(tok, "tokenizer")


def test_length_policy_truncates_prompt_then_drops():
    ids = list(range(20))
    labels = [IGNORE_INDEX] * 12 + ids[12:]
    out_ids, out_labels, status = apply_length_policy(ids, labels, 16, "prompt_then_drop", keep_prefix=1)
    assert status == "truncated" and len(out_ids) == 16 and out_ids[0] == 0
    assert out_labels[-8:] == ids[12:], "the whole response survives"
    _, _, status = apply_length_policy(ids, labels, 6, "prompt_then_drop", keep_prefix=1)
    assert status == "dropped"
    _, _, status = apply_length_policy(ids, labels, 16, "drop", keep_prefix=1)
    assert status == "dropped"


def test_long_real_sample_never_loses_its_response():
    tok, info = _prep("llama2", "alpaca")
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short answer."}]
    row = tokenize_chat(tok, long_prompt, info, 64)
    assert row["status"] == "truncated" and len(row["input_ids"]) == 64
    assert row["input_ids"][0] == tok.bos_token_id
    span = _trained_spans(row["input_ids"], row["labels"])[0]
    assert tok.decode(span).strip() == "Short answer.</s>" or tok.decode(span, skip_special_tokens=True).strip() == "Short answer."


def test_text_chunks_are_fully_trained():
    tok, info = _prep("llama2", "alpaca")
    rows = tokenize_text(tok, "Once upon a time there was a cat. " * 30, 64, info)
    assert len(rows) > 1 and all(len(r["input_ids"]) <= 64 for r in rows)
    assert rows[0]["input_ids"][0] == tok.bos_token_id and rows[-1]["input_ids"][-1] == tok.eos_token_id
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_seq2seq_targets_end_with_eos():
    tok = load_shared_tokenizer("t5")
    row = tokenize_seq2seq(tok, "summarize: Amanda baked cookies.", "Amanda baked.", 64)
    assert row["labels"][-1] == tok.eos_token_id and row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["labels"], skip_special_tokens=True) == "Amanda baked."


def test_tokenizer_fingerprint_tracks_what_changes_the_rows(monkeypatch):
    """The cheap fingerprint the tokenize map is cached under: same tokenizer -> same key,
    another vocabulary, an added token or another chat template -> another key; and the map
    really uses it (a second identical map is a cache hit with identical rows)."""
    import datasets

    from plugtune.config import validate_recipe
    from plugtune.data.pipeline import tokenize_dataset, tokenizer_fingerprint

    a, b = load_shared_tokenizer("qwen2_5"), load_shared_tokenizer("qwen2_5")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(load_shared_tokenizer("llama3_2"))
    before = tokenizer_fingerprint(b)
    b.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(b) != before
    c = load_shared_tokenizer("qwen2_5")
    c.add_tokens(["<plugtune_new>"])
    assert tokenizer_fingerprint(c) != before

    recipe = validate_recipe({"base_model": "x", "datasets": [{"path": "x.jsonl", "type": "messages"}]})
    ds = datasets.Dataset.from_list([{"messages": ONE_TURN}, {"messages": MULTI}])
    info = probe_template(a)
    first = tokenize_dataset(ds, a, recipe, "causal", info)
    again = tokenize_dataset(ds, load_shared_tokenizer("qwen2_5"), recipe, "causal", info)
    other = tokenize_dataset(ds, a, recipe.model_copy(update={"sequence_len": 7}), "causal", info)
    assert first._fingerprint == again._fingerprint != other._fingerprint
    assert first["input_ids"] == again["input_ids"]


def test_context_turn_the_template_rewrites_is_part_of_the_next_prompt():
    """Qwen3 renders an assistant turn with its ``<think>`` block only while it is the last one:
    an untrained earlier turn is context, rendered as the template renders it later; a trained
    one still cannot be split (a family plugin splits such conversations: plugtune_chat_rows)."""
    from plugtune.data.tokenize import TemplateRenderError

    tok = load_shared_tokenizer("qwen3")
    info = probe_template(tok)
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add.", "train": False},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "Add again."}]
    out = tokenize_chat(tok, msgs, info, 512)
    plain = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
    assert tok.decode(out["input_ids"]) == tok.apply_chat_template(plain, tokenize=False)
    spans = trained_spans(out["input_ids"], out["labels"])
    assert [tok.decode(s) for s in spans] == ["<think>\nAdd again.\n</think>\n\n6<|im_end|>"]
    with pytest.raises(TemplateRenderError, match="turn 3"):
        tokenize_chat(tok, plain, info, 512)


def test_history_rewriting_template_is_split_into_the_views_it_forces():
    """Generic route, no family plugin: Qwen3's template strips earlier turns' reasoning, so one
    row is not prefix-stable; tokenize_chat_rows trains each turn in the row where it is the
    turn being generated, exactly as the template renders it there (independently rendered)."""
    from plugtune.data.tokenize import tokenize_chat_rows

    tok = load_shared_tokenizer("qwen3")
    info = probe_template(tok)
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add."},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "Add again."}]
    rows = tokenize_chat_rows(tok, msgs, info, 512)
    assert len(rows) == 2
    for row, k in zip(rows, (1, 3), strict=True):
        want = (tok.apply_chat_template(msgs[: k + 1], tokenize=False)
                [len(tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)):])
        spans = trained_spans(row["input_ids"], row["labels"])
        assert [tok.decode(s) for s in spans] == [want.rstrip("\n")]
        assert tok.decode(row["input_ids"]) == tok.apply_chat_template(msgs[: k + 1], tokenize=False)
    # a prefix-stable template keeps one row
    llama = load_shared_tokenizer("llama3_2")
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
    assert len(tokenize_chat_rows(llama, plain, probe_template(llama), 512)) == 1
