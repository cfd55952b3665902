"""Data from other tools, read in place from ../shared/data: LLaMA-Factory's dataset_info.json
(ShareGPT tool calls, system / images / kto / ranking entries), content given as a list of parts,
preference and KTO layouts (TRL, Anthropic HH, axolotl types), compressed files.

Label checks use real tokenizers: the trained tokens decode to exactly the assistant text."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from plugtune.config import DatasetConfig, RecipeError, validate_recipe
from plugtune.data.errors import DataError
from plugtune.data.loading import to_canonical
from plugtune.data.pipeline import chat_for_template
from plugtune.data.registry import resolve_llamafactory
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.testing import load_shared_tokenizer, shared_path, trained_spans


def _lf():
    return shared_path("llama_factory")


def _trained_spans(tok, row) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    return [tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])]


def _tokenize(tok, example, max_len=4096):
    msgs, tools = chat_for_template(tok, example)
    return tokenize_chat(tok, msgs, probe_template(tok), max_len, tools=tools)


def _glaive():
    return DatasetConfig(**resolve_llamafactory("glaive_toolcall_en_demo", _lf())[0])


@pytest.fixture(scope="module")
def _qwen_once():
    return load_shared_tokenizer("qwen2_5")


@pytest.fixture
def qwen(_qwen_once):
    """The Qwen2.5 tokenizer with its own chat template restored after each test (tests set
    named templates on it; a deep copy per test would cost ~2.5 s)."""
    own = _qwen_once.chat_template
    yield _qwen_once
    _qwen_once.chat_template = own


# --- LLaMA-Factory dataset_info.json ---------------------------------------------------------

def test_dataset_info_entries_resolve_to_their_formats():
    names = "identity,alpaca_en_demo,glaive_toolcall_en_demo,mllm_demo,c4_demo,dpo_en_demo,kto_en_demo"
    cfgs = [DatasetConfig(**d) for d in resolve_llamafactory(names, _lf())]
    assert [c.type for c in cfgs] == ["alpaca", "alpaca", "sharegpt", "vision", "text",
                                      "preference", "kto"]
    kinds = []
    for cfg, n in zip(cfgs, [91, 999, 300, 6, 300, 300, 300]):
        ds, skipped = to_canonical(cfg)
        assert skipped == 0 and len(ds) == n
        kinds.append(sorted(k for k, v in ds[0].items() if v is not None))
    assert kinds[3] == ["images", "messages"] and kinds[4] == ["text"]
    assert kinds[5] == ["chosen", "prompt", "rejected"] and kinds[6] == ["completion", "label", "prompt"]
    kto, _ = to_canonical(cfgs[6])
    raw = json.loads((_lf() / "kto_en_demo.json").read_text())
    assert [r["label"] for r in raw] == kto["label"]
    assert kto[0]["completion"] == raw[0]["messages"][-1]["content"]


def test_dataset_info_errors_name_the_entry(tmp_path):
    with pytest.raises(DataError, match="no dataset named 'glaive_toolcal'; did you mean glaive_toolcall"):
        resolve_llamafactory("glaive_toolcal", _lf())
    with pytest.raises(DataError, match="dataset_info.json: not found"):
        resolve_llamafactory("x", tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"v": {"file_name": "nope.json"}, "s": {"script_url": "x"}}))
    with pytest.raises(DataError, match="'v': file_name .*nope.json.* does not exist"):
        resolve_llamafactory("v", tmp_path)
    with pytest.raises(DataError, match="'s': script_url datasets are not supported"):
        resolve_llamafactory(["s"], tmp_path)
    with pytest.raises(DataError, match="stage dpo needs a preference dataset"):
        resolve_llamafactory("identity", _lf(), stage="dpo")


def test_recipe_dataset_and_dataset_dir_keys():
    r = validate_recipe({"base_model": "m", "dataset": "identity, glaive_toolcall_en_demo",
                         "dataset_dir": str(_lf())})
    assert [d.type for d in r.datasets] == ["alpaca", "sharegpt"]
    assert r.dataset is None and r.datasets[1].columns["tools"] == "tools"
    with pytest.raises(RecipeError, match="no dataset named 'nope'"):
        validate_recipe({"base_model": "m", "dataset": "nope", "dataset_dir": str(_lf())})


def test_alpaca_system_and_history_columns(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{
        "instruction": "And 3+3?", "input": "", "output": "6", "system": "Be exact.",
        "history": [["1+1?", "2"]]}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system",
        "history": "history"}}}))
    ds, _ = to_canonical(DatasetConfig(**resolve_llamafactory("d", tmp_path)[0]))
    assert [(m["role"], m["content"]) for m in ds[0]["messages"]] == [
        ("system", "Be exact."), ("user", "1+1?"), ("assistant", "2"), ("user", "And 3+3?"),
        ("assistant", "6")]


# --- tool calls ------------------------------------------------------------------------------

def _glaive_expected(raw_turns, render_call, eot):
    out = []
    for t in raw_turns[:max(i for i, t in enumerate(raw_turns) if t["from"] in ("gpt", "function_call")) + 1]:
        if t["from"] == "gpt":
            out.append(t["value"] + eot)
        elif t["from"] == "function_call":
            out.append(render_call(json.loads(t["value"])) + eot)
    return out


def test_sharegpt_tool_calls_train_through_the_qwen25_template(qwen):
    """function_call turns are trained as the template's own tool-call text; observations and
    the tools schema are prompt."""
    raw = json.loads((_lf() / "glaive_toolcall_en_demo.json").read_text())
    ds, _ = to_canonical(_glaive())
    qwen_call = lambda c: ('<tool_call>\n{"name": "' + c["name"] + '", "arguments": '  # noqa: E731
                           + json.dumps(c["arguments"], ensure_ascii=False) + "}\n</tool_call>")
    checked = 0
    for i in range(6):
        row = _tokenize(qwen, ds[i])
        assert _trained_spans(qwen, row) == _glaive_expected(raw[i]["conversations"], qwen_call, "<|im_end|>")
        text = qwen.decode(row["input_ids"])
        for fn in json.loads(raw[i]["tools"] or "[]"):  # tools are in the prompt
            assert fn["description"] in text
        checked += any(t["from"] == "function_call" for t in raw[i]["conversations"])
    assert checked >= 2


def test_tool_calls_through_llama32_template():
    tok = load_shared_tokenizer("llama3_2")
    raw = json.loads((_lf() / "glaive_toolcall_en_demo.json").read_text())
    ds, _ = to_canonical(_glaive())
    i = next(i for i, r in enumerate(raw) if any(t["from"] == "function_call" for t in r["conversations"]))
    call = lambda c: ('{"name": "' + c["name"] + '", "parameters": '  # noqa: E731
                      + json.dumps(c["arguments"], ensure_ascii=False) + "}")
    spans = _trained_spans(tok, _tokenize(tok, ds[i]))
    expected = _glaive_expected(raw[i]["conversations"], call, "<|eot_id|>")
    assert [s.strip() for s in spans] == [e.strip() for e in expected]


def test_tool_fallback_for_templates_without_tools(qwen):
    """ChatML has no tool support: the call is trained as JSON text, the tools go into the
    system turn and results become 'Observation:' user turns (flatten_tools)."""
    from plugtune.data.formats import OBSERVATION_PREFIX, TOOLS_FALLBACK_HEADER
    from plugtune.data.templates import ensure_chat_template

    ensure_chat_template(qwen, "chatml")
    raw = json.loads((_lf() / "glaive_toolcall_en_demo.json").read_text())
    ds, _ = to_canonical(_glaive())
    i = next(i for i, r in enumerate(raw) if any(t["from"] == "function_call" for t in r["conversations"]))
    row = _tokenize(qwen, ds[i])
    call = lambda c: json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)  # noqa: E731
    assert _trained_spans(qwen, row) == _glaive_expected(raw[i]["conversations"], call, "<|im_end|>")
    text = qwen.decode(row["input_ids"])
    assert TOOLS_FALLBACK_HEADER.strip() in text and OBSERVATION_PREFIX in text


# --- content as parts, vision ------------------------------------------------------------------

def test_content_parts_train_the_assistant_text(qwen):
    path = _lf() / "v1_sft_demo.jsonl"
    raw = [json.loads(x) for x in path.read_text().splitlines()[:20]]
    ds, _ = to_canonical(DatasetConfig(path=str(path), type="messages", max_samples=20))
    for r, ex in zip(raw, ds):
        expected = ["".join(p["value"] for p in m["content"]) + "<|im_end|>"
                    for m in r["messages"] if m["role"] == "assistant"]
        assert _trained_spans(qwen, _tokenize(qwen, ex)) == expected


def test_image_parts_become_placeholders_with_paths():
    path = _lf() / "v1_multimodal_demo.jsonl"
    raw = json.loads(path.read_text().splitlines()[0])
    ds, _ = to_canonical(DatasetConfig(path=str(path), type="vision"))
    ex = ds[0]
    assert ex["messages"][0]["content"] == "<image>Who are they?"
    assert ex["messages"][2]["content"] == "What are they doing?<image>"
    assert ex["images"] == [str(_lf() / "mllm_demo_data/1.jpg")] * 2
    assert len(raw["messages"]) == len(ex["messages"])
    with pytest.raises(DataError, match="an 'image_url' part in a text-only dataset"):
        to_canonical(DatasetConfig(path=str(path), type="messages"))


def test_chat_template_type_with_embedded_images():
    """HF llava-instruct-mix-vsft layout: image parts filled from an Image column of bytes."""
    path = shared_path("configs/axolotl/fixtures/HuggingFaceH4__llava-instruct-mix-vsft.parquet")
    ds, _ = to_canonical(DatasetConfig(path=str(path), type="chat_template", split="train[:1%]"))
    assert len(ds) == 1
    ex = ds[0]
    assert ex["messages"][0]["content"].count("<image>") == len(ex["images"]) >= 1
    from PIL import Image

    with Image.open(ex["images"][0]) as im:
        assert im.size[0] > 0


# --- axolotl types ---------------------------------------------------------------------------

def _fixture(name):
    return str(shared_path("configs/axolotl/fixtures", name))


def test_axolotl_chat_template_type_trains_assistant_text():
    import datasets

    tok = load_shared_tokenizer("llama3_2")
    path = _fixture("fozziethebeat__alpaca_messages_2k_test.parquet")
    raw = datasets.load_dataset("parquet", data_files=path, split="train")
    ds, _ = to_canonical(DatasetConfig(path=path, type="chat_template", field_messages="messages",
                                       message_property_mappings={"role": "role", "content": "content"},
                                       roles_to_train=["assistant"], train_on_eos="turn"))
    for i in range(5):
        expected = [m["content"].strip() + "<|eot_id|>" for m in raw[i]["messages"] if m["role"] == "assistant"]
        assert _trained_spans(tok, _tokenize(tok, ds[i])) == expected
    with pytest.raises(ValueError, match="trains assistant turns only"):
        DatasetConfig(path=path, type="chat_template", roles_to_train=["user"])


def test_completion_is_axolotl_raw_text_and_old_files_get_pointed_to_prompt_completion(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "Once upon a time."}) + "\n")
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="completion", field="body"))
    assert ds[0]["text"] == "Once upon a time."
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    with pytest.raises(DataError, match="use type: prompt_completion"):
        to_canonical(DatasetConfig(path=str(old), type="completion"))
    with pytest.raises(ValueError, match="use type: prompt_completion"):
        DatasetConfig(path=str(old), type="completion", columns={"completion": "answer"})
    ds, _ = to_canonical(DatasetConfig(path=str(old), type="prompt_completion"))
    assert ds[0]["messages"][1]["content"] == "4"


PREF = [
    # (fixture, type, extra keys)
    ("fozziethebeat__alpaca_messages_2k_dpo_test.parquet", "chat_template.default",
     {"field_messages": "conversation", "field_chosen": "chosen", "field_rejected": "rejected",
      "message_property_mappings": {"role": "role", "content": "content"},
      "roles": {"system": ["system"], "user": ["user"], "assistant": ["assistant"]}}),
    ("argilla__ultrafeedback-binarized-preferences-cleaned.parquet", "chat_template.argilla", {}),
    ("argilla__distilabel-intel-orca-dpo-pairs.parquet", "bradley_terry.chat_template", {}),
]


@pytest.mark.parametrize("name,type_,extra", PREF, ids=[p[1] for p in PREF])
def test_axolotl_preference_types(name, type_, extra, qwen):
    import datasets

    from plugtune.data.preference import tokenize_pair

    raw = datasets.load_dataset("parquet", data_files=_fixture(name), split="train")
    ds, _ = to_canonical(DatasetConfig(path=_fixture(name), type=type_, **extra))
    assert len(ds) == len(raw) == 40
    info = probe_template(qwen)
    for i in range(4):
        r, ex = raw[i], ds[i]
        side = lambda v: v if isinstance(v, str) else (v["content"] if isinstance(v, dict) else v[-1]["content"])  # noqa: E731
        assert ex["chosen"] == side(r["chosen"]) and ex["rejected"] == side(r["rejected"])
        user = next(m["content"] for m in ex["prompt"] if m["role"] == "user")
        assert user in json.dumps(dict(r), default=str, ensure_ascii=False).replace("\\n", "\n") or user
        pair = tokenize_pair(qwen, info, ex["prompt"], ex["chosen"], ex["rejected"], 4096)
        assert qwen.decode(pair["chosen_ids"]) == ex["chosen"] + "<|im_end|>"
        assert qwen.decode(pair["rejected_ids"]) == ex["rejected"] + "<|im_end|>"


def test_llama3_ultra_kto_rows():
    import datasets

    path = _fixture("argilla__ultrafeedback-binarized-preferences-cleaned-kto.parquet")
    raw = datasets.load_dataset("parquet", data_files=path, split="train")
    ds, _ = to_canonical(DatasetConfig(path=path, type="llama3.ultra"))
    assert ds["label"] == raw["label"] and ds["completion"] == raw["completion"]
    assert [p[-1]["content"] for p in ds["prompt"]] == raw["prompt"]


# --- preference layouts people export --------------------------------------------------------

def _dpo_rows(n=5):
    rows = json.loads((_lf() / "dpo_en_demo.json").read_text())
    return [r for r in rows if len(r["conversations"]) == 1][:n]


def test_trl_conversational_and_full_transcript_pairs(tmp_path):
    rows = _dpo_rows()
    conv, full, hh = [], [], []
    for r in rows:
        user = {"role": "user", "content": r["conversations"][0]["value"]}
        ch = {"role": "assistant", "content": r["chosen"]["value"]}
        rj = {"role": "assistant", "content": r["rejected"]["value"]}
        conv.append({"prompt": [user], "chosen": [ch], "rejected": [rj]})
        full.append({"chosen": [user, ch], "rejected": [user, rj]})
        hh.append({"chosen": f"\n\nHuman: {user['content']}\n\nAssistant: {ch['content']}",
                   "rejected": f"\n\nHuman: {user['content']}\n\nAssistant: {rj['content']}"})
    for name, data in (("conv", conv), ("full", full), ("hh", hh)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(json.dumps(x) for x in data))
        ds, _ = to_canonical(DatasetConfig(path=str(p), type="preference"))
        for r, ex in zip(rows, ds):
            assert ex["prompt"] == [{"role": "user", "content": r["conversations"][0]["value"].strip()
                                     if name == "hh" else r["conversations"][0]["value"]}], name
            assert ex["chosen"] == (r["chosen"]["value"].strip() if name == "hh" else r["chosen"]["value"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                               "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}))
    with pytest.raises(DataError, match=r"bad.jsonl:1 .*differ before their last assistant turn"):
        to_canonical(DatasetConfig(path=str(bad), type="preference"))


def test_v1_dpo_full_transcripts_with_parts():
    path = _lf() / "v1_dpo_demo.jsonl"
    raw = [json.loads(x) for x in path.read_text().splitlines()]
    ds, _ = to_canonical(DatasetConfig(path=str(path), type="preference"))
    assert len(ds) == len(raw)
    r = raw[0]
    assert ds[0]["chosen"] == "".join(p["value"] for p in r["chosen_messages"][-1]["content"])
    assert [m["role"] for m in ds[0]["prompt"]] == [m["role"] for m in r["chosen_messages"][:-1]]


def test_kto_prompt_completion_label_rows(tmp_path):
    p, q = tmp_path / "k.jsonl", tmp_path / "conv.jsonl"
    p.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "label": True}))
    q.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+3?"}],
                             "completion": [{"role": "assistant", "content": "6"}], "label": False}))
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="kto"))
    assert ds[0] == {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4", "label": True}
    ds, _ = to_canonical(DatasetConfig(path=str(q), type="kto"))
    assert ds[0] == {"prompt": [{"role": "user", "content": "2+3?"}], "completion": "6", "label": False}


# --- compressed files ------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["gz", "bz2", "xz", "zst"])
def test_compressed_jsonl(tmp_path, ext):
    src = (_lf() / "c4_demo.jsonl").read_bytes()
    if ext == "zst":
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(src)
    else:
        data = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[ext](src)
    p = tmp_path / f"c4.jsonl.{ext}"
    p.write_bytes(data)
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="text"))
    assert len(ds) == 300 and ds[0]["text"] == json.loads(src.splitlines()[0])["text"]


def test_compressed_file_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": broken\n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: malformed JSON line"):
        to_canonical(DatasetConfig(path=str(p), type="text"))


# --- axolotl chat_template names ---------------------------------------------------------------

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."}]


@pytest.mark.parametrize("tok_name,template", [("qwen2_5", "qwen_25"), ("gemma3", "gemma")])
def test_named_templates_match_the_models_own(tok_name, template):
    """plugtune's qwen_25 / gemma render as Qwen2.5's / Gemma 3's own templates (read from their
    tokenizer_config.json; BOS aside: the tokenizer adds it, one per sequence)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from plugtune.data.templates import TEMPLATES

    own = json.loads(shared_path("tokenizers", tok_name, "tokenizer_config.json").read_text())
    for conv in (CONV, CONV[1:]):
        def render(t, conv=conv):
            return render_jinja_template([conv], chat_template=t, bos_token="<BOS>")[0][0]
        assert render(own["chat_template"]).removeprefix("<BOS>") == render(TEMPLATES[template])


def test_llama3_template_labels_and_fallback_names():
    from plugtune.data.templates import TemplateError, ensure_chat_template

    tok = load_shared_tokenizer("llama3_2")
    assert ensure_chat_template(tok, "llama3") == []
    row = tokenize_chat(tok, CONV, probe_template(tok), 512)
    assert [tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])] == [
        "Hello!<|eot_id|>", "Bye.<|eot_id|>"]
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    falcon = load_shared_tokenizer("falcon")  # ships no chat template
    assert ensure_chat_template(falcon, "tokenizer_default_fallback_chatml") == ["<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>" in falcon.chat_template
    with pytest.raises(TemplateError, match="tokenizer_default, but the tokenizer ships no chat template"):
        ensure_chat_template(load_shared_tokenizer("falcon"), "tokenizer_default")
    with pytest.raises(TemplateError, match="'deepseek_v3'.*not bundled"):
        ensure_chat_template(tok, "deepseek_v3")


@pytest.mark.parametrize("policy,expected", [
    ("turn", ["Hello!<|im_end|>", "Bye.<|im_end|>"]),
    ("last", ["Hello!", "Bye.<|im_end|>"]),
    ("none", ["Hello!", "Bye."]),
    ("all", ["<|im_end|>", "<|im_end|>", "Hello!<|im_end|>", "<|im_end|>", "Bye.<|im_end|>"]),
])
def test_train_on_eos(qwen, policy, expected):
    from plugtune.data.pipeline import apply_train_on_eos
    from plugtune.data.templates import ensure_chat_template

    ensure_chat_template(qwen, "qwen_25")
    info = probe_template(qwen)
    row = tokenize_chat(qwen, CONV, info, 512)
    labels = apply_train_on_eos(row["input_ids"], row["labels"], info.stop_token_ids, policy)
    assert [qwen.decode(s) for s in trained_spans(row["input_ids"], labels)] == expected


def test_train_on_eos_reaches_prepare(tmp_path, qwen):
    from plugtune.data.errors import DataError
    from plugtune.data.pipeline import prepare

    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CONV}) + "\n")
    ds = {"path": str(p), "type": "messages", "train_on_eos": "none"}
    recipe = validate_recipe({"base_model": "m", "chat_template": "qwen_25", "datasets": [ds]})
    row = prepare(recipe, qwen).train[0]
    assert [qwen.decode(s) for s in trained_spans(row["input_ids"], row["labels"])] == ["Hello!", "Bye."]
    recipe = validate_recipe({"base_model": "m", "datasets": [ds, {**ds, "train_on_eos": "all"}]})
    with pytest.raises(DataError, match="different train_on_eos"):
        prepare(recipe, qwen)


def test_dataset_dir_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from plugtune.config import load_recipe

    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    (data / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "i.json"}}))
    (data / "i.json").write_text(json.dumps([{"instruction": "hi", "output": "Hello."}]))
    (tmp_path / "proj" / "r.yaml").write_text("base_model: m\ndataset: identity\ndataset_dir: data\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(tmp_path / "proj" / "r.yaml")
    assert r.datasets[0].path == str(data / "i.json")


def test_kto_answer_renders_as_the_trained_completion():
    import datasets

    from plugtune.data.preference import render_pair

    tok = load_shared_tokenizer("llama3_2")
    path = _fixture("argilla__ultrafeedback-binarized-preferences-cleaned-kto.parquet")
    raw = datasets.load_dataset("parquet", data_files=path, split="train")
    ds, _ = to_canonical(DatasetConfig(path=path, type="llama3.ultra", max_samples=3))
    info = probe_template(tok)
    for r, ex in zip(raw, ds):
        prompt_text, answer = render_pair(tok, info, ex["prompt"], ex["completion"])
        assert answer == r["completion"].strip() + "<|eot_id|>" and r["prompt"].strip() in prompt_text


def _axolotl_dataset_entries():
    import yaml

    root = shared_path("configs", "axolotl")
    out = []
    for cfg in sorted(root.glob("*.y*ml")):
        for ds in yaml.safe_load(cfg.read_text()).get("datasets") or []:
            out.append(pytest.param(cfg.name, ds, id=f"{cfg.stem}:{ds['type']}"))
    return out


@pytest.mark.parametrize("config,entry", _axolotl_dataset_entries())
def test_axolotl_example_dataset_entries_load_unchanged_but_for_path(config, entry):
    """Every ``datasets:`` entry of axolotl's example configs, with its hub id replaced by the
    local stand-in (fixtures/README.md), loads with its own type and keys."""
    from plugtune.data.formats import KINDS

    hub = entry["path"].replace("/", "__")
    fixtures = shared_path("configs", "axolotl", "fixtures")
    local = next(p for p in fixtures.iterdir() if p.name.split(".")[0] == hub)
    ds, skipped = to_canonical(DatasetConfig(**{**entry, "path": str(local)}))
    assert len(ds) >= 1 and skipped == 0
    kind = {"messages": "chat", "chosen": "preference", "label": "kto", "text": "text"}
    got = next(v for k, v in kind.items() if ds[0].get(k) is not None)
    assert got == KINDS[entry["type"]]


def test_tool_and_plain_chat_datasets_mix_but_kinds_do_not():
    from plugtune.data.loading import load_datasets

    cfgs = [DatasetConfig(**d) for d in resolve_llamafactory(
        "glaive_toolcall_en_demo,identity,c4_demo", _lf(), max_samples=20)]
    mixed, stats = load_datasets(cfgs[:2])
    assert len(mixed) == 40
    with_tools = [ex for ex in mixed if ex["tools"]]
    assert with_tools and any(m["tool_calls"] for ex in with_tools for m in ex["messages"])
    with pytest.raises(DataError, match="must share a kind.*c4_demo.jsonl: text"):
        load_datasets(cfgs)


def test_per_turn_training_flags(tmp_path, qwen):
    """LLaMA-Factory v1 ``loss_weight`` and axolotl ``message_field_training``: an assistant turn
    marked untrained is context only."""
    turns = [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
             {"role": "assistant", "content": [{"type": "text", "value": "Hello."}], "loss_weight": 0.0},
             {"role": "user", "content": [{"type": "text", "value": "bye"}], "loss_weight": 0.0},
             {"role": "assistant", "content": [{"type": "text", "value": "Bye."}], "loss_weight": 1.0}]
    p = tmp_path / "v1.jsonl"
    p.write_text(json.dumps({"messages": turns}) + "\n")
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="messages"))
    assert _trained_spans(qwen, _tokenize(qwen, ds[0])) == ["Bye.<|im_end|>"]
    q = tmp_path / "ax.jsonl"
    q.write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello.", "train": False},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Bye.", "train": True}]}) + "\n")
    ds, _ = to_canonical(DatasetConfig(path=str(q), type="chat_template", message_field_training="train"))
    assert _trained_spans(qwen, _tokenize(qwen, ds[0])) == ["Bye.<|im_end|>"]
    turns[3]["loss_weight"] = 0.5
    p.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match=r"v1.jsonl:1 .*loss_weight.*only 0 \(not trained\) or 1"):
        to_canonical(DatasetConfig(path=str(p), type="messages"))


def test_reasoning_content_is_kept_on_assistant_turns(tmp_path):
    """An assistant turn's ``reasoning_content`` reaches the template (Qwen3 reads it); Arrow
    fills turns without it with None, which :func:`template_messages` drops."""
    from plugtune.data.formats import template_messages

    p = tmp_path / "r.jsonl"
    turns = [{"role": "user", "content": "q"},
             {"role": "assistant", "content": "a", "reasoning_content": "because"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    p.write_text(json.dumps({"messages": turns}) + "\n")
    ds, _ = to_canonical(DatasetConfig(path=str(p), type="messages"))
    msgs, _ = template_messages(ds[0])
    assert msgs == turns
    p.write_text(json.dumps({"messages": [turns[0], {**turns[1], "reasoning_content": ["x"]}]}) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl:1 .*messages\[1\]\.reasoning_content.: expected a string"):
        to_canonical(DatasetConfig(path=str(p), type="messages"))
