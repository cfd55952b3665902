"""Template parity: what a saved run's tokenizer renders is exactly what plugtune trained on.

For every named template and every family tokenizer in ``../shared/data/tokenizers``, the
tokenizer saved into a run folder, reloaded with plain ``AutoTokenizer``, gives through
``apply_chat_template(..., tokenize=True)`` the same token ids (one BOS) as plugtune's training
tokenization, and the generation config written beside it stops on the end-of-turn token.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, GenerationConfig

from plugtune.data.formats import alpaca
from plugtune.data.templates import TEMPLATES, ensure_chat_template
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.testing import load_shared_tokenizer

TOKENIZERS = ["llama2", "mistral_v1", "falcon", "qwen2_5", "llama3_2", "qwen3", "gemma3"]
CHATS = [
    alpaca({"instruction": "Name a colour.", "input": "", "output": "Blue."}, {})["messages"],
    alpaca({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}, {})["messages"],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "See you."}],
]


ORDER = sorted(TEMPLATES, key=lambda n: n == "chatml")  # chatml last: saved, reloaded, compared


@pytest.mark.parametrize("fam", TOKENIZERS)
def test_saved_templates_give_the_trained_ids(fam, tmp_path):
    """Each named template is set on the family tokenizer as training sets it; the training ids
    are compared with ``apply_chat_template(tokenize=True)`` of the tokenizer saved into a run
    folder and reloaded with ``AutoTokenizer`` (one save/reload per family: big vocabularies
    take seconds to load; the template text is saved verbatim)."""
    from plugtune.export.portable import write_generation_config

    tok = load_shared_tokenizer(fam)
    bos_added = tok("a")["input_ids"][0] == tok.bos_token_id
    trained, templates, infos = {}, {}, {}
    for name in ORDER:
        ensure_chat_template(tok, name)
        infos[name] = info = probe_template(tok)
        templates[name] = tok.chat_template
        trained[name] = [tokenize_chat(tok, c, info, max_len=4096)["input_ids"] for c in CHATS]
        for chat, ids in zip(CHATS, trained[name]):  # this template, this vocabulary
            got = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
            assert got == ids, f"{fam}/{name}: {tok.decode(got)!r} != {tok.decode(ids)!r}"
        for ids in trained[name]:
            if bos_added:  # BOS once, first
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (fam, name)
    run = tmp_path / "run"
    tok.save_pretrained(run)
    write_generation_config(run, tok)
    saved = AutoTokenizer.from_pretrained(run)
    assert saved.chat_template == templates[ORDER[-1]]
    for name in ORDER[-1:]:  # the round trip (vocabulary grown by every template's tokens)
        saved.chat_template = templates[name]
        for chat, ids in zip(CHATS, trained[name]):
            got = saved.apply_chat_template(chat, tokenize=True)["input_ids"]
            assert got == ids, f"{fam}/{name}: {saved.decode(got)!r} != {tok.decode(ids)!r}"
    stops = GenerationConfig.from_pretrained(run).eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    assert saved.convert_tokens_to_ids("<|im_end|>") in stops  # chatml's end-of-turn
    assert set(infos["chatml"].stop_token_ids) <= set(stops)


def test_alpaca_is_stanfords_prompt():
    """The strings of tatsu-lab/stanford_alpaca ``PROMPT_DICT`` (= axolotl's alpaca prompter),
    with and without input, and the no-input prompt of ../shared's Alpaca-rendered Dolly file."""
    import json

    from plugtune.testing import shared_path

    tok = load_shared_tokenizer("falcon")  # no BOS: the rendered text is the prompt itself
    ensure_chat_template(tok, "alpaca")
    with_input = alpaca({"instruction": "Sum", "input": "1 2", "output": "3"}, {})["messages"]
    assert tok.apply_chat_template(with_input[:1], tokenize=False, add_generation_prompt=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n")
    rec = json.loads(shared_path("dolly", "dolly_validation_151.alpaca_prompt_answer.jsonl")
                     .read_text().splitlines()[0])
    src = json.loads(shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")
                     .read_text().splitlines()[0])
    assert not src["context"]
    no_input = alpaca({"instruction": src["instruction"], "output": "x"}, {})["messages"]
    text = tok.apply_chat_template(no_input[:1], tokenize=False, add_generation_prompt=True)
    assert text.rstrip("\n") == rec["prompt"]
