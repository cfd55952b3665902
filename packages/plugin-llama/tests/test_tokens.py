"""Pad and stop tokens with the real Llama 2, Llama 3.2, Qwen2.5 and Falcon (for BLOOM) tokenizers."""

from __future__ import annotations

import pytest
import torch

from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.modeling import generate_causal, stop_token_ids
from plugtune.testing import load_shared_tokenizer, make_spec
from plugtune_llama._tokens import STOP_TOKENS, set_family_pad, stop_ids

CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize("name,family,pad", [
    ("llama3_2", "llama", "<|finetune_right_pad_id|>"),  # no pad in the tokenizer, eos = eot
    ("llama2", "llama", "<unk>"),
    ("qwen2_5", "qwen2", "<|endoftext|>"),  # Qwen's own pad is kept (also a generation stop)
    ("falcon", "bloom", "<|endoftext|>"),  # no pad/unk candidates: pad = eos
])
def test_family_pad(name, family, pad):
    tok = load_shared_tokenizer(name)
    assert set_family_pad(tok, family) == pad
    if name not in ("falcon", "qwen2_5"):
        assert tok.pad_token_id not in stop_ids(tok, family)


def test_llama3_pad_replaces_eos_pad():
    tok = load_shared_tokenizer("llama3_2")
    tok.pad_token = tok.eos_token  # what many scripts do
    set_family_pad(tok, "llama")
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id == 128004


@pytest.mark.parametrize("name,family,eot", [("llama3_2", "llama", "<|eot_id|>"),
                                              ("qwen2_5", "qwen2", "<|im_end|>")])
def test_end_of_turn_is_trained_and_stops_generation(name, family, eot):
    tok = load_shared_tokenizer(name)
    set_family_pad(tok, family)
    info = probe_template(tok)  # core already finds the end-of-turn token of the template
    assert info.end_of_turn == eot
    row = tokenize_chat(tok, CHAT, info, 256)
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.convert_ids_to_tokens(trained[-1]) == eot
    assert tok.decode(trained[:-1]).strip() == "Blue."
    stops = stop_token_ids(tok, None, STOP_TOKENS[family])
    want = {"llama": {128009, 128008, 128001}, "qwen2": {151645, 151643}}[family]
    assert want <= set(stops)
    if family == "llama":
        assert tok.pad_token_id not in stops


def test_eos_stays_trained_when_pad_is_eos(tiny_dirs):
    """BLOOM with the Falcon tokenizer pads with EOS; the collated labels still train EOS."""
    spec, pm = make_spec("bloom", path=str(tiny_dirs("bloom")), chat_template="alpaca")
    tok = pm.hook.plugtune_load(spec=spec).tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    ensure_chat_template(tok, "alpaca")
    info = probe_template(tok)
    rows = [tokenize_chat(tok, CHAT, info, 128),
            tokenize_chat(tok, [CHAT[0], {"role": "assistant", "content": "A long answer: red."}],
                          info, 128)]
    batch = pm.hook.plugtune_collate(spec=spec, tokenizer=tok)(rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        trained = batch["labels"][i][batch["labels"][i] != -100]
        assert trained[-1] == tok.eos_token_id  # the response's EOS is a trained label
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == tok.eos_token_id).all()


def test_generation_stops_on_family_stop_token(tiny_dirs):
    """A model forced to emit ``<|eom_id|>`` stops after one token with the plugin's stop set and
    runs to max_new_tokens with core's (template-only) stop set."""
    spec, pm = make_spec("llama", path=str(tiny_dirs("llama3")))
    loaded = pm.hook.plugtune_load(spec=spec)
    model, tok = loaded.model, loaded.tokenizer
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    model.generation_config.sequence_bias = {(eom,): 100.0}
    lengths = []
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = spy
    pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=["Hi"], max_new_tokens=5,
                              images=None)
    generate_causal(model, tok, ["Hi"], 5)  # core alone: <|eom_id|> is not a stop
    assert lengths == [1, 5]


def test_left_padding_for_generation_right_for_training(tiny_dirs):
    spec, pm = make_spec("llama", path=str(tiny_dirs("llama2")), chat_template="llama2")
    loaded = pm.hook.plugtune_load(spec=spec)
    tok = loaded.tokenizer
    assert tok.padding_side == "right"
    batch = pm.hook.plugtune_collate(spec=spec, tokenizer=tok)(
        [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"][1].tolist() == [1, 7, tok.pad_token_id]
    ensure_chat_template(tok, "llama2")
    prompts = ["Hi", "Tell me a story about a small red fox in the snow."]
    batched = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=tok,
                                        prompts=prompts, max_new_tokens=5, images=None)
    single = [pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=tok, prompts=[p],
                                        max_new_tokens=5, images=None)[0] for p in prompts]
    assert batched == single and tok.padding_side == "right"
    assert torch.is_tensor(batch["labels"])
