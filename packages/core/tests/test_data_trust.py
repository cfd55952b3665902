"""Tokens are exactly what the user meant: one BOS, structure-safe truncation, untrained and
unrepresentable samples counted, record-size guard, and the small bad-input messages."""

from __future__ import annotations

import json
import logging
import time

import pytest

from plugtune.config import DatasetConfig, validate_recipe
from plugtune.data.loading import DataError, to_canonical
from plugtune.data.pipeline import prepare
from plugtune.data.templates import TEMPLATES, ensure_chat_template
from plugtune.data.tokenize import IGNORE_INDEX, probe_template, tokenize_chat, tokenize_text
from plugtune.testing import load_shared_tokenizer


def _prep(name, template):
    tok = load_shared_tokenizer(name)
    ensure_chat_template(tok, template)
    return tok, probe_template(tok)


def _leading_bos(ids, bos):
    n = 0
    while n < len(ids) and ids[n] == bos:
        n += 1
    return n


# --- 1. exactly one BOS --------------------------------------------------------------------

def test_raw_text_that_starts_with_bos_gets_one_bos():
    tok, info = _prep("llama2", "llama2")
    text = "<s>[INST] Name a colour. [/INST] Red. </s>"
    row = tokenize_text(tok, text, 512, info)[0]
    assert _leading_bos(row["input_ids"], tok.bos_token_id) == 1
    assert row["input_ids"].count(tok.bos_token_id) == 1
    assert tok.decode(row["input_ids"][1:-1]).strip() == text[len("<s>"):].strip()


@pytest.mark.parametrize("name,template", [("llama2", "alpaca"), ("llama2", "bos-jinja"),
                                           ("llama3_2", None), ("mistral_v1", "mistral")])
def test_chat_has_one_bos_when_template_or_text_holds_one(name, template):
    tok = load_shared_tokenizer(name)
    if template == "bos-jinja":  # a template that emits the BOS itself
        ensure_chat_template(tok, "{{ bos_token }}" + TEMPLATES["alpaca"])
    else:
        ensure_chat_template(tok, template)
    info = probe_template(tok)
    bos = tok.bos_token
    msgs = [{"role": "system", "content": f"{bos}You are terse."} if template != "mistral" else
            {"role": "user", "content": f"{bos}Hi"},
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    if template == "mistral":
        msgs = [msgs[0], msgs[2]]
    row = tokenize_chat(tok, msgs, info, 512)
    assert _leading_bos(row["input_ids"], tok.bos_token_id) == 1
    assert row["labels"][0] == IGNORE_INDEX


# --- 2. truncation keeps the template's structure and the system prompt ----------------------

LONG = "filler words that make the prompt long " * 40


@pytest.mark.parametrize("name,template,head", [("qwen2_5", None, "<|im_start|>system"),
                                                ("llama2", "llama2", "<s>[INST] <<SYS>>"),
                                                ("mistral_v1", "mistral", "<s>[INST]")])
def test_truncation_shortens_contents_never_structure(name, template, head):
    tok, info = _prep(name, template)
    system = [] if template == "mistral" else [{"role": "system", "content": "SYSTEM RULES."}]
    msgs = [*system,
            {"role": "user", "content": "Old question? " + LONG},
            {"role": "assistant", "content": "Old answer."},
            {"role": "user", "content": "Summarise this: " + LONG},
            {"role": "assistant", "content": "A short summary."}]
    full = tokenize_chat(tok, msgs, info, 4096)
    row = tokenize_chat(tok, msgs, info, 200)
    assert row["status"] == "truncated" and row["length"] <= 200
    assert row["cut_tokens"] == full["length"] - row["length"] > 0
    text = tok.decode(row["input_ids"])
    assert text.replace(" ", "").startswith(head.replace(" ", ""))
    if system:
        assert "SYSTEM RULES." in text
    assert "Old answer." not in text, "the oldest turn goes first"
    assert "Summarise this:" in text, "the user message keeps its beginning"
    trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])
    assert "A short summary." in trained
    # what is left is exactly the template's rendering of shortened messages
    body = text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text
    assert "[/INST]" in body or "<|im_start|>assistant" in body


def test_prepare_counts_cut_tokens(tmp_path):
    tok = load_shared_tokenizer("qwen2_5")
    p = tmp_path / "long.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": q, "output": "Yes."})
                           for q in ["Short?", "Long? " + LONG, "Long too? " + LONG]))
    recipe = validate_recipe({"base_model": "x", "sequence_len": 128,
                              "datasets": [{"path": str(p), "type": "alpaca"}]})
    s = prepare(recipe, tok).stats
    assert s["truncated"] == 2 and s["truncated_tokens"] > 2 * 100


# --- 6. samples that train nothing -----------------------------------------------------------

def _text_recipe(tmp_path, texts):
    p = tmp_path / "texts.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return p, validate_recipe({"base_model": "x", "sequence_len": 64,
                               "datasets": [{"path": str(p), "type": "text"}]})


def test_dataset_that_tokenizes_to_nothing_is_an_error_naming_the_file(tmp_path):
    tok = load_shared_tokenizer("llama2")
    p, recipe = _text_recipe(tmp_path, ["</s>", "<s>", "</s>", "A real sentence."])
    with pytest.raises(DataError, match=rf"{p.name}.*3 of 4 samples train nothing"):
        prepare(recipe, tok)


def test_a_few_untrained_samples_are_counted_and_left_out(tmp_path, caplog):
    tok = load_shared_tokenizer("llama2")
    _, recipe = _text_recipe(tmp_path, ["</s>", "One sentence.", "Two sentences.", "Three."])
    with caplog.at_level(logging.WARNING):
        data = prepare(recipe, tok)
    assert data.stats["untrained"] == 1 and data.stats["rows"] == 3
    assert "1 of 4 samples train nothing" in caplog.text


# --- 3. text the tokenizer cannot represent --------------------------------------------------

def test_unknown_tokens_in_labels_warn_with_counts_and_example(tmp_path, caplog):
    tok = load_shared_tokenizer("t5")
    p = tmp_path / "code.jsonl"
    p.write_text("\n".join(json.dumps({"source": f"write json {i}", "target": '{"a": 1}\nok'})
                           for i in range(3)))
    recipe = validate_recipe({"base_model": "x", "sequence_len": 64,
                              "datasets": [{"path": str(p), "type": "seq2seq"}]})
    with caplog.at_level(logging.WARNING):
        s = prepare(recipe, tok, "seq2seq").stats
    assert s["unk_label_tokens"] == 6 and s["unk_label_samples"] == 3
    assert s["lossy_samples"] == 3 and "<unk>" in s["unk_example"]
    assert "6 trained label tokens in 3 samples are the unknown token '<unk>'" in caplog.text
    assert "3 of 3 checked samples do not decode back" in caplog.text


def test_representable_text_gives_no_warning(tmp_path, caplog):
    tok = load_shared_tokenizer("llama2")
    _, recipe = _text_recipe(tmp_path, ['{"a": 1}\nok', "Line one.\n\nLine two."])
    with caplog.at_level(logging.WARNING):
        s = prepare(recipe, tok).stats
    assert s["lossy_samples"] == 0 and s.get("unk_label_tokens", 0) == 0
    assert "cannot represent" not in caplog.text


# --- 7. per-record size limit ----------------------------------------------------------------

def test_oversized_record_is_an_error_naming_file_and_line_before_parsing(tmp_path):
    p = tmp_path / "big.jsonl"
    small = json.dumps({"text": "fine"})
    with p.open("w") as f:
        f.write(small + "\n" + small + "\n")
        f.write(json.dumps({"text": "x" * 3_000_000}) + "\n")
        f.write(small + "\n")
    cfg = DatasetConfig(path=str(p), type="text", max_record_bytes=2_000_000)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"{p.name}:3: record longer than max_record_bytes=2,000,000"):
        to_canonical(cfg)
    assert time.perf_counter() - t0 < 5
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="text", max_record_bytes=None))
    assert len(ds) == 4
    assert DatasetConfig(path="x.jsonl", type="text").max_record_bytes == 10_000_000


def test_record_size_scan_counts_lines_across_read_blocks(tmp_path):
    from plugtune.data.loading import check_record_sizes

    p = tmp_path / "lines.txt"
    p.write_bytes(b"abc\n" * 10 + b"y" * 40 + b"\n" + b"ok\n")
    check_record_sizes(p, 40, chunk=7)
    with pytest.raises(DataError, match=r"lines.txt:11:"):
        check_record_sizes(p, 39, chunk=7)


# --- 8. small bad-input messages -------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file_names_the_file(tmp_path, suffix):
    p = tmp_path / f"empty{suffix}"
    p.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{p.name}: the file is empty"):
        to_canonical(DatasetConfig(path=str(p), type="alpaca"))


def test_column_mismatch_hints_columns_mapping(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(3)))
    with pytest.raises(DataError, match=r"columns: \{instruction: question\}") as err:
        to_canonical(DatasetConfig(path=str(p), type="alpaca"))
    assert "on_bad_row" not in str(err.value)


def test_identical_preference_pair_names_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(DataError, match=rf"{p.name}:2 .*'rejected': is identical to chosen"):
        to_canonical(DatasetConfig(path=str(p), type="preference"))


def test_preference_prompt_that_starts_with_bos_gets_one_bos():
    from plugtune.data.preference import tokenize_pair

    tok, info = _prep("llama2", "alpaca")
    row = tokenize_pair(tok, info, [{"role": "system", "content": "<s>Be terse."},
                                    {"role": "user", "content": "Colour?"}], "Red.", "Blue.", 256)
    assert _leading_bos(row["prompt_ids"], tok.bos_token_id) == 1


def test_preference_prompt_truncation_keeps_system_and_structure():
    from plugtune.data.preference import tokenize_pair

    tok, info = _prep("qwen2_5", None)
    prompt = [{"role": "system", "content": "SYSTEM RULES."},
              {"role": "user", "content": "Old question? " + LONG},
              {"role": "assistant", "content": "Old answer."},
              {"role": "user", "content": "Summarise this: " + LONG}]
    row = tokenize_pair(tok, info, prompt, "A short summary.", "No.", 200)
    assert row["status"] == "truncated" and row["length"] <= 200
    text = tok.decode(row["prompt_ids"])
    assert text.startswith("<|im_start|>system\nSYSTEM RULES.<|im_end|>")
    assert "Old answer." not in text and "Summarise this:" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_record_size_scan_memory_is_bounded_by_its_block(tmp_path):
    import tracemalloc

    from plugtune.data.loading import check_record_sizes

    p = tmp_path / "huge.jsonl"
    with p.open("wb") as f:
        f.write(b'{"text": "' + b"x" * 20_000_000 + b'"}\n')
    tracemalloc.start()
    with pytest.raises(DataError, match=r"huge.jsonl:1:"):
        check_record_sizes(p, 10_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * (1 << 20), f"peak {peak} bytes for a 20 MB line"
