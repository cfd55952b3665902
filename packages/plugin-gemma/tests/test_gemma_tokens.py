"""Gemma's chat format on the real Gemma 3 tokenizer: one ``<bos>``, labels ending at
``<end_of_turn>``, the system prompt folded into the first user turn, generation stopping on
``<end_of_turn>`` / ``<eos>``."""

from __future__ import annotations

import pytest
import torch

from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import probe_template, tokenize_chat, tokenize_text
from plugtune.plugins import get_plugin_manager
from plugtune.testing import load_shared_tokenizer, make_spec, trained_spans

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "Paris."}],
    "system + two turns": [{"role": "system", "content": "Answer in one word."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris."}],
    "untrained middle turn": [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "5.", "train": False},
                              {"role": "user", "content": "Again?"},
                              {"role": "assistant", "content": "4."}],
}
#: the tokenizer's own template (emits ``{{ bos_token }}``) and core's named ``gemma`` template
#: (emits none: the tokenizer's BOS is the one)
TEMPLATES = [None, "gemma"]


def _tokenizer(template):
    tok = load_shared_tokenizer("gemma3")  # a fresh object: ensure_chat_template may replace it
    ensure_chat_template(tok, template)
    return tok


@pytest.mark.parametrize("template", TEMPLATES, ids=["own", "gemma"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_every_row_starts_with_exactly_one_bos(template, name):
    tok = _tokenizer(template)
    info = probe_template(tok)
    bos = tok.bos_token_id
    row = tokenize_chat(tok, CONVERSATIONS[name], info, 256)
    assert row["status"] == "kept"
    ids, labels = row["input_ids"], row["labels"]
    assert ids[0] == bos and ids.count(bos) == 1, tok.decode(ids[:4])
    assert labels[0] == -100  # the BOS is never trained
    # the trap this guards against: the rendered text with the tokenizer's own BOS gives two
    text = tok.apply_chat_template(CONVERSATIONS[name], tokenize=False)
    naive = tok(text)["input_ids"]
    assert naive[:2].count(bos) == (2 if info.bos_in_template else 1)


@pytest.mark.parametrize("text", ["plain text to continue", "<bos>text that starts with a BOS"])
def test_raw_text_rows_start_with_exactly_one_bos(gemma_tok, text):
    info = probe_template(gemma_tok)
    rows = tokenize_text(gemma_tok, text, 64, info)
    assert rows[0]["input_ids"][0] == gemma_tok.bos_token_id
    assert rows[0]["input_ids"].count(gemma_tok.bos_token_id) == 1


@pytest.mark.parametrize("template", TEMPLATES, ids=["own", "gemma"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_end_at_end_of_turn_per_trained_turn(template, name):
    tok = _tokenizer(template)
    msgs = CONVERSATIONS[name]
    row = tokenize_chat(tok, msgs, probe_template(tok), 256)
    got = [tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])]
    want = [m["content"] + "<end_of_turn>" for m in msgs
            if m["role"] == "assistant" and m.get("train") is not False]
    assert got == want
    text = tok.decode(row["input_ids"])
    assert "<start_of_turn>model\n" in text and "system" not in text
    if msgs[0]["role"] == "system":  # folded into the first user turn, as the template does
        assert f"<start_of_turn>user\n{msgs[0]['content']}\n\n{msgs[1]['content']}" in text


class _Scripted:
    """A forward hook on the LM head making greedy decoding emit ``script`` token by token
    (then repeat its last entry): +1e4 on the scripted token's logit at each step."""

    def __init__(self, script: list[int]):
        self.script, self.step = script, 0

    def __call__(self, module, args, out):
        tid = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        out = out.clone()
        out[..., -1, tid] += 1e4
        return out


@pytest.mark.parametrize("stop,stops", [("<end_of_turn>", True), ("<eos>", True),
                                        ("<start_of_turn>", False)])
def test_generation_stops_at_end_of_turn_and_eos(gemma_tok, stop, stops):
    """Greedy decoding scripted to say ``Paris``, ``Paris``, ``stop``, ``Paris`` ...: the answer
    ends before ``stop`` when it is a stop token; ``<start_of_turn>`` (control) is not one."""
    from transformers import AutoModelForCausalLM

    from plugtune_gemma.tiny import tiny_config

    pm = get_plugin_manager()
    spec, _ = make_spec("gemma3_text", pm=pm)
    assert spec.family.name == "gemma3_text"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3_text", len(gemma_tok)))
    word = gemma_tok.convert_tokens_to_ids("▁Paris")
    stop_id = gemma_tok.convert_tokens_to_ids(stop)
    model.lm_head.register_forward_hook(_Scripted([word, word, stop_id, word]))
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=gemma_tok,
                                    prompts=["Capital of France?"], max_new_tokens=6,
                                    images=None, processor=None)
    assert out == (["Paris Paris"] if stops else ["Paris Paris Paris Paris Paris"])
    prompt = seen[0][0].tolist()  # the prefill: the rendered prompt, one <bos> (not two)
    assert prompt[0] == gemma_tok.bos_token_id and prompt.count(gemma_tok.bos_token_id) == 1
