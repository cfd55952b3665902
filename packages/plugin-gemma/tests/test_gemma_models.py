"""Gemma models (tiny, from transformers' config classes): the soft-capped label-only loss equals
the model's own, packed rows equal the samples alone under a binding sliding window, Gemma 2
loads with eager attention, and the plugin contract for each model type."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PLUGIN_NAME
from transformers import AutoModelForCausalLM

from plugtune import attention
from plugtune.data.collate import Collator
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.modeling import _label_only, _label_only_parts, loss_from_batch
from plugtune.plugins import get_plugin_manager
from plugtune.testing import PluginContract, make_spec
from plugtune_gemma.tiny import tiny_config

SOFTCAPPED = ["gemma2", "gemma3_text", "gemma4_text"]
CHATS = [
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}],
]


def _tiny(model_type: str, vocab_size: int, impl: str = "eager", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, **overrides),
                                            attn_implementation=impl)


@pytest.mark.parametrize("model_type", SOFTCAPPED)
def test_label_only_loss_applies_the_softcap(gemma_tok, model_type):
    """Rows of the real Gemma 3 tokenizer (one ``<bos>`` each) through a tiny model whose logits
    (init std 1: |logit| up to ~20) exceed the soft cap of 2: the label-only head is used (not
    the full-logit fallback) and its loss and gradients equal the model's own loss; without the
    cap the label-only loss would differ (the control)."""
    info = probe_template(gemma_tok)
    rows = [tokenize_chat(gemma_tok, c, info, 128) for c in CHATS]
    assert all(r["input_ids"].count(gemma_tok.bos_token_id) == 1 for r in rows)
    batch = Collator(pad_token_id=gemma_tok.pad_token_id)(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    n = int((batch["labels"][:, 1:] != -100).sum())
    cap = 2.0
    model = _tiny(model_type, len(gemma_tok), final_logit_softcapping=cap, initializer_range=1.0)

    parts = _label_only_parts(model, batch)
    assert parts is not None and parts[3] == cap
    got = loss_from_batch(model, batch, n)
    assert getattr(model, "_plugtune_label_only_head", None) is True  # verified, kept
    got.backward()
    got_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    ref = model(**batch, use_cache=False, num_items_in_batch=n).loss
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, model.get_output_embeddings().weight.grad,
                               rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        uncapped = _label_only(parts[1], parts[2], {**batch, "use_cache": False}, n)
    assert abs(float(uncapped) - float(ref.detach())) > 0.1, "the cap changes nothing: test is vacuous"


def test_other_logit_transforms_still_use_the_models_forward():
    """A soft-capping forward (Gemma 2) whose config also sets a logit scale is not reproduced:
    only the soft cap is."""
    model = _tiny("gemma2", 64, final_logit_softcapping=2.0)
    ids = torch.randint(3, 64, (1, 8))
    batch = {"input_ids": ids, "labels": ids.clone()}
    assert _label_only_parts(model, batch) is not None
    model.config.logit_scale = 0.5
    assert _label_only_parts(model, batch) is None


#: (model type, attention): eager and sdpa, and plugtune's per-sample sdpa that ``load_model``
#: switches packed CPU runs to (Gemma 2: eager only, see test_gemma2_loads_with_eager_attention)
PACKING = [("gemma2", "eager"), ("gemma3_text", "eager"), ("gemma3_text", "sdpa"),
           ("gemma3_text", "packed"), ("gemma4_text", "sdpa"), ("gemma4_text", "packed")]


@pytest.mark.parametrize("model_type,impl", PACKING)
def test_packed_logits_equal_alone_with_a_binding_sliding_window(model_type, impl):
    """Three samples (7, 10, 6 tokens) packed into one row of 23 with position ids restarting,
    ``use_cache=False``, through one sliding layer (window 4) and one global layer: each
    sample's logits equal the sample run alone. Controls: the window binds (a window of 512
    changes the logits) and with a cache the samples leak into each other."""
    model = _tiny(model_type, 128, "sdpa" if impl == "packed" else impl).eval()
    if impl == "packed":
        assert attention.enable(model)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 128, (n,), generator=g) for n in (7, 10, 6)]
    ids = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in samples])
        leaky = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
        wide = _tiny(model_type, 128, "eager", sliding_window=512).eval()
        unbound = wide(input_ids=samples[1][None], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-2
    assert (unbound - alone[7:17]).abs().max() > 1e-3, "the sliding window does not bind"


def _saved_spec(tiny_dir, model_type, **recipe):
    pm = get_plugin_manager()
    spec, _ = make_spec(model_type, path=str(tiny_dir(model_type)), pm=pm, **recipe)
    assert spec.plugin == PLUGIN_NAME
    return spec, pm


@pytest.mark.parametrize("model_type,asked,expect", [
    ("gemma2", {}, "eager"),
    ("gemma2", {"attn_implementation": "sdpa"}, "eager"),
    ("gemma2", {"flash_attention": True}, "eager"),  # no CUDA here: flash-attn unusable
    ("gemma3_text", {}, "sdpa"),
])
def test_gemma2_loads_with_eager_attention(tiny_dir, caplog, model_type, asked, expect):
    """transformers refuses sdpa for Gemma 2 (attention soft cap); the plugin loads it with eager
    and says so, while Gemma 3 keeps core's sdpa."""
    spec, pm = _saved_spec(tiny_dir, model_type, **asked)
    with caplog.at_level(logging.INFO):
        loaded = pm.hook.plugtune_load(spec=spec)
    assert loaded.model.config._attn_implementation == expect
    if model_type == "gemma2":
        assert loaded.model.config.attn_logit_softcapping is not None
        assert any("eager" in r.getMessage() for r in caplog.records)
    if asked.get("attn_implementation") == "sdpa":
        with pytest.raises(ValueError, match="scaled_dot_product_attention"):  # the control: what core alone would do
            AutoModelForCausalLM.from_pretrained(spec.path, attn_implementation="sdpa")


_TOKENIZER: list = []


class _GemmaContract(PluginContract):
    plugin_name = PLUGIN_NAME
    tokenizer_name = "gemma3"

    def make_tokenizer(self):  # one Gemma 3 tokenizer for every contract class (33 MB to parse)
        if not _TOKENIZER:
            _TOKENIZER.append(super().make_tokenizer())
        return _TOKENIZER[0]

    def make_model(self):
        return _tiny(self.model_type, len(self.make_tokenizer()))


class TestGemmaContract(_GemmaContract):
    model_type = "gemma"


class TestGemma2Contract(_GemmaContract):
    model_type = "gemma2"


class TestGemma3TextContract(_GemmaContract):
    model_type = "gemma3_text"


class TestGemma4TextContract(_GemmaContract):
    model_type = "gemma4_text"
