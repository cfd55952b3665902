"""Formats on the real sets in ../shared/data, multi-task mixing, and bad-input messages."""

from __future__ import annotations

import json

import pytest

from plugtune.config import DatasetConfig
from plugtune.data.loading import DataError, load_datasets, to_canonical
from plugtune.testing import shared_path


def _cfg(path, type_, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), type=type_, **kw)


# --- formats on real data -------------------------------------------------------------------

REAL = [
    # (path under ../shared/data, type, columns, expected kind key, records)
    ("dolly/dolly_validation_151.instruction_context_response.jsonl", "dolly", {}, "messages", 151),
    ("dolly/dolly_validation_151.alpaca_prompt_answer.jsonl", "prompt_completion", {"completion": "answer"}, "messages", 151),
    ("alpaca/alpaca_tiny.torchtune.json", "alpaca", {}, "messages", 100),
    ("llama_factory/alpaca_en_demo.json", "alpaca", {}, "messages", 999),
    ("llama_factory/dpo_en_demo.json", "preference", {}, "chosen", 300),
    ("torchtune_assets/stack_exchange_paired_tiny.json", "preference", {}, "chosen", 25),
    ("samsum/test.json", "seq2seq", {"source": "dialogue", "target": "summary"}, "source", 819),
    ("llama_factory/kto_en_demo.json", "messages", {}, "messages", 300),
]


@pytest.mark.parametrize("rel,type_,cols,key,n", REAL, ids=[r[1] + ":" + r[0].split("/")[-1] for r in REAL])
def test_real_formats(rel, type_, cols, key, n):
    ds, skipped = to_canonical(_cfg(shared_path(rel), type_, columns=cols))
    assert len(ds) == n and skipped == 0
    ex = ds[0]
    assert key in ex
    if key == "messages":
        roles = [m["role"] for m in ex["messages"]]
        assert "assistant" in roles and roles[0] in ("system", "user")
        assert all(m["content"].strip() for m in ex["messages"])
    if key == "chosen":
        assert ex["chosen"] != ex["rejected"] and ex["prompt"][-1]["role"] == "user"


def test_dolly_context_goes_into_the_user_turn():
    path = shared_path("dolly/dolly_validation_151.instruction_context_response.jsonl")
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    ds, _ = to_canonical(_cfg(path, "dolly"))
    i = next(i for i, r in enumerate(raw) if r["context"].strip())
    user, asst = ds[i]["messages"]
    assert raw[i]["instruction"] in user["content"] and raw[i]["context"] in user["content"]
    assert asst["content"] == raw[i]["response"]


def test_sharegpt_and_text(tmp_path):
    p = tmp_path / "sg.jsonl"
    p.write_text(json.dumps({"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}) + "\n")
    ds, _ = to_canonical(_cfg(p, "sharegpt"))
    assert [m["role"] for m in ds[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": "Once upon a time."}) + "\n")
    ds, _ = to_canonical(_cfg(t, "text"))
    assert ds[0]["text"] == "Once upon a time."


def test_csv_and_parquet(tmp_path):
    import datasets

    rows = {"instruction": ["a", "b"], "input": ["", "x"], "output": ["A", "B"]}
    datasets.Dataset.from_dict(rows).to_csv(tmp_path / "d.csv")
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        ds, _ = to_canonical(_cfg(tmp_path / name, "alpaca"))
        assert ds[1]["messages"][0]["content"] == "b\n\nx"


def test_multitask_mix_shuffles_and_counts():
    dolly = _cfg(shared_path("dolly/dolly_validation_151.instruction_context_response.jsonl"), "dolly")
    alpaca = _cfg(shared_path("alpaca/alpaca_tiny.torchtune.json"), "alpaca")
    ds, stats = load_datasets([dolly, alpaca])
    assert len(ds) == 251 and sum(stats["per_dataset"].values()) == 251
    first_50_users = [ex["messages"][0]["content"] for ex in ds.select(range(50))]
    assert len(set(first_50_users)) == 50


# --- bad input ------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n{"instruction": "d", "output": "e"}\n')
    with pytest.raises(DataError) as exc:
        to_canonical(_cfg(p, "alpaca"))
    assert f"{p}:2" in str(exc.value) and "malformed JSON" in str(exc.value)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as exc:
        to_canonical(_cfg(p, "alpaca"))
    assert f"{p}:2" in str(exc.value) and "UTF-8" in str(exc.value)


@pytest.mark.parametrize("rec,field,why", [
    ({"instruction": "a"}, "output", "missing"),
    ({"instruction": "a", "output": None}, "output", "None"),
    ({"instruction": "a", "output": "   "}, "output", "empty"),
], ids=["missing", "none", "empty"])
def test_bad_field_names_file_line_and_field(tmp_path, rec, field, why):
    p = tmp_path / "d.jsonl"
    good = {"instruction": "q", "output": "r"}
    p.write_text("\n".join(json.dumps(r) for r in (good, good, rec)) + "\n")
    with pytest.raises(DataError) as exc:
        to_canonical(_cfg(p, "alpaca"))
    msg = str(exc.value)
    assert f"{p}:3" in msg and f"'{field}'" in msg and why in msg


def test_skip_bad_rows_counts(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "q", "output": "r"}, {"instruction": "q", "output": ""}, {"instruction": "q2", "output": "r2"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds, skipped = to_canonical(_cfg(p, "alpaca", on_bad_row="skip"))
    assert len(ds) == 2 and skipped == 1


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        to_canonical(_cfg(tmp_path / "nope.jsonl", "alpaca"))


def test_column_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    ds, _ = to_canonical(_cfg(p, "prompt_completion", columns={"prompt": "question", "completion": "answer"}))
    assert ds[0]["messages"][1]["content"] == "Because."


@pytest.mark.parametrize(("prefix", "source", "expected"), [
    (None, "A: hi", "A: hi"),
    ("", "A: hi", "A: hi"),
    ("summarize:", "A: hi", "summarize: A: hi"),
    ("Summarize this dialogue:\n", "A: hi", "Summarize this dialogue:\nA: hi"),
    ("translate English to German: ", "cat", "translate English to German: cat"),
])
def test_seq2seq_system_prompt_is_the_task_prefix(tmp_path, prefix, source, expected):
    """An encoder-decoder has no system turn: ``system_prompt`` prefixes the source (T5 style),
    and generation prompts get the same prefix (``with_system_prompt``)."""
    from plugtune.data.formats import with_system_prompt

    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"dialogue": source, "summary": "greeting"}) + "\n")
    ds, _ = to_canonical(DatasetConfig(path=str(f), type="seq2seq", system_prompt=prefix,
                                       columns={"source": "dialogue", "target": "summary"}))
    assert ds[0]["source"] == expected and ds[0]["target"] == "greeting"
    assert with_system_prompt(source, prefix, "seq2seq") == expected


def test_chat_generation_prompt_gets_the_system_turn():
    from plugtune.data.formats import with_system_prompt

    assert with_system_prompt("hi", "Be brief.", "chat") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert with_system_prompt("hi", None, "chat") == "hi"
    assert with_system_prompt("Once upon", "Be brief.", "text") == "Once upon"


@pytest.mark.parametrize(("dtype", "rec"), [
    ("alpaca", {"instruction": "i", "input": "", "output": "o"}),
    ("dolly", {"instruction": "i", "context": "", "response": "r"}),
    ("prompt_completion", {"prompt": "p", "completion": "c"}),
    ("messages", {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
    ("text", {"text": "t"}),
    ("seq2seq", {"source": "s", "target": "t"}),
])
def test_kinds_table_matches_what_each_adapter_produces(dtype, rec):
    """``KINDS`` (used to shape generation prompts) covers every type and agrees with the adapter."""
    from plugtune.data.formats import ADAPTERS, KINDS, kind_of

    assert set(KINDS) == set(ADAPTERS)
    assert kind_of(ADAPTERS[dtype](rec, {})) == KINDS[dtype]


def test_bad_row_hint_names_the_dataset_key(tmp_path):
    """The hint says where to set on_bad_row: datasets[N].on_bad_row (a top-level one is unknown)."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"instruction": "q", "output": "r"}) + "\n")
    bad.write_text(json.dumps({"instruction": "q", "output": ""}) + "\n")
    with pytest.raises(DataError, match=r"set datasets\[1\]\.on_bad_row: skip"):
        load_datasets([_cfg(good, "alpaca"), _cfg(bad, "alpaca")])
    with pytest.raises(DataError, match=r"set test_datasets\[0\]\.on_bad_row: skip"):
        load_datasets([_cfg(bad, "alpaca")], key="test_datasets")
