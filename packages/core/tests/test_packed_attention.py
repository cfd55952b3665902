"""Per-sample sdpa for packed rows (plugtune.attention) and the label-only LM head loss
(plugtune.modeling.label_only_loss): same numbers as the model's own path, or no change."""

from __future__ import annotations

import pytest
import torch

from plugtune import attention
from plugtune.data.collate import Collator
from plugtune.data.packing import pack_rows
from plugtune.modeling import label_only_loss, loss_from_batch


def _packed_batch(vocab: int = 100, lengths=(7, 12, 5, 9, 14, 3), capacity: int = 24):
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * (n // 2) + s[n // 2:] for s, n in zip(samples, lengths)]
    rows = pack_rows(samples, labels, capacity)
    feats = [{k: rows[k][i] for k in ("input_ids", "labels", "position_ids")}
             for i in range(len(rows["input_ids"]))]
    return Collator(pad_token_id=0)(feats), rows


def test_segment_starts_follow_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert attention.segment_starts(pos) == [[0, 3, 5], [0]]
    m = attention.block_causal_mask([[0, 2]], 4)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [False, False, True, False], [False, False, True, True]]


def test_packed_attention_matches_sdpa_and_each_sample_alone(make_tiny_llama):
    ref = make_tiny_llama(vocab_size=100)
    fast = make_tiny_llama(vocab_size=100)  # same seed -> same weights
    assert attention.enable(fast) and fast.config._attn_implementation == attention.NAME
    batch, rows = _packed_batch()
    assert max(len(attention.segment_starts(batch["position_ids"][i:i + 1])[0])
               for i in range(len(batch["input_ids"]))) > 1, "rows must hold several samples"
    calls = []
    real = attention._split_plan
    try:
        attention._split_plan = lambda *a: calls.append(1) or real(*a)
        out_fast = fast(**batch, use_cache=False)
    finally:
        attention._split_plan = real
    out_ref = ref(**batch, use_cache=False)
    assert calls, "the packed path was not taken"
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_fast.loss.backward()
    out_ref.loss.backward()
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
    with torch.no_grad():  # and no sample sees another
        for r, ids in enumerate(rows["input_ids"]):
            starts = [*attention.segment_starts(torch.tensor([rows["position_ids"][r]]))[0], len(ids)]
            for a, b in zip(starts, starts[1:]):
                alone = fast(input_ids=torch.tensor([ids[a:b]]), use_cache=False).logits[0]
                torch.testing.assert_close(out_fast.logits[r, a:b].detach(), alone, atol=1e-4, rtol=1e-4)


def test_packed_attention_leaves_padding_and_generation_alone(make_tiny_llama):
    ref = make_tiny_llama(vocab_size=100)
    fast = make_tiny_llama(vocab_size=100)
    attention.enable(fast)
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits * mask[..., None],
                                   ref(input_ids=ids, attention_mask=mask).logits * mask[..., None])
        g_fast = fast.generate(ids[:2, :6], attention_mask=torch.ones(2, 6, dtype=torch.long),
                               max_new_tokens=4, do_sample=False, pad_token_id=0)
        g_ref = ref.generate(ids[:2, :6], attention_mask=torch.ones(2, 6, dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g_fast, g_ref)


def test_load_model_picks_packed_attention_only_for_packed_cpu_training(demo_model_dir):
    from plugtune.modeling import load_model
    from plugtune.testing import make_spec

    if torch.cuda.is_available():
        pytest.skip("CPU policy")
    packed, _ = make_spec("causal_lm", path=str(demo_model_dir), sample_packing=True)
    plain, _ = make_spec("causal_lm", path=str(demo_model_dir), sample_packing=False)
    pinned, _ = make_spec("causal_lm", path=str(demo_model_dir), sample_packing=True,
                          attn_implementation="eager")
    assert load_model(packed).config._attn_implementation == attention.NAME
    assert load_model(plain).config._attn_implementation == "sdpa"
    assert load_model(pinned).config._attn_implementation == "eager"


@pytest.mark.parametrize("n_items", [None, 37])
def test_label_only_loss_equals_the_models_loss_and_grads(make_tiny_llama, n_items):
    a = make_tiny_llama(vocab_size=100)
    b = make_tiny_llama(vocab_size=100)
    batch, _ = _packed_batch()
    la = loss_from_batch(a, batch, n_items)  # label-only (verified on this first call)
    assert a._plugtune_label_only_head is True
    kw = {"num_items_in_batch": n_items} if n_items is not None else {}
    lb = b(**batch, use_cache=False, **kw).loss
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-7, rtol=1e-4, msg=n)


def test_label_only_loss_with_lora_and_dropout(make_tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(vocab_size=100),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))
    model.train()
    batch, _ = _packed_batch()
    torch.manual_seed(5)
    loss = loss_from_batch(model, batch)  # verified with the same dropout masks
    assert model.get_base_model()._plugtune_label_only_head is True
    torch.manual_seed(5)
    expect = model(**batch, use_cache=False).loss
    torch.testing.assert_close(loss, expect, atol=1e-6, rtol=1e-5)


def test_label_only_loss_declines_transformed_logits_and_other_inputs(make_tiny_llama):
    model = make_tiny_llama(vocab_size=100)
    batch, _ = _packed_batch()
    assert label_only_loss(model, {**batch, "pixel_values": torch.zeros(1)}) is None
    model.config.final_logit_softcapping = 30.0
    assert label_only_loss(model, dict(batch)) is None


def test_label_only_loss_falls_back_when_the_model_disagrees(make_tiny_llama):
    model = make_tiny_llama(vocab_size=100)
    real_forward = model.forward

    def scaled_forward(*a, **kw):  # a model whose own forward changes the logits
        labels = kw.pop("labels")
        out = real_forward(*a, **kw)
        logits = out.logits * 2
        out.loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return out

    model.forward = scaled_forward
    batch, _ = _packed_batch()
    loss = loss_from_batch(model, batch)
    assert model._plugtune_label_only_head is False
    torch.testing.assert_close(loss, scaled_forward(**batch, use_cache=False).loss)
    assert label_only_loss(model, dict(batch)) is None  # decided once


def test_label_only_loss_never_lets_packed_samples_attend_to_each_other(make_tiny_llama):
    """Called directly, without ``use_cache=False``: still the per-sample loss (a cache would
    make transformers ignore the position-id restarts)."""
    model = make_tiny_llama(vocab_size=100)
    model.config.use_cache = True
    batch, _ = _packed_batch()
    ref = model(**batch, use_cache=False).loss
    leaky = model(**batch, use_cache=True).loss
    assert not torch.allclose(ref, leaky, atol=1e-4)  # the control: a cache does leak here
    got = label_only_loss(model, {k: v for k, v in batch.items() if k != "use_cache"})
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_label_only_loss_only_for_heads_whose_forward_is_a_plain_linear(make_tiny_llama):
    """RecurrentGemma soft-caps its logits (``logits_soft_cap``, a name no allow-list had): with
    small random logits the one-row check passed and training then optimised another objective.
    The forward is read instead: only ``logits = self.lm_head(hidden)`` left unchanged passes."""
    from transformers import AutoModelForCausalLM, RecurrentGemmaConfig

    from plugtune.modeling import _label_only_parts, plain_head_forward

    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, lru_width=32,
                               attention_window_size=16, block_types=["recurrent", "attention"],
                               logits_soft_cap=30.0)
    rg = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(3, 100, (1, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    assert _label_only_parts(rg, batch) is None
    torch.testing.assert_close(loss_from_batch(rg, batch), rg(**batch, use_cache=False).loss)
    llama = make_tiny_llama(vocab_size=100)
    assert _label_only_parts(llama, batch) is not None
    assert plain_head_forward(type(llama), "lm_head")


class _CappedThenScaled(torch.nn.Module):
    """A forward with Gemma's soft-cap block followed by one more change of the logits."""

    def forward(self, hidden):
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        logits = logits * 2
        return logits


class _CapElsewhere(torch.nn.Module):
    """The soft-cap statements, but not right after the head: refused (only the exact shape of
    Gemma's forward is reproduced, anything else keeps the model's own loss)."""

    def forward(self, hidden):
        logits = self.lm_head(hidden)
        hidden = hidden * 2
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        return logits


@pytest.mark.parametrize("cls_name,expect", [
    ("LlamaForCausalLM", "plain"), ("Gemma2ForCausalLM", "softcap"),
    ("Gemma3ForCausalLM", "softcap"), ("RecurrentGemmaForCausalLM", None),
    ("CohereForCausalLM", None), (_CappedThenScaled, None), (_CapElsewhere, None),
])
def test_head_forward_recognises_exactly_head_plus_softcap(cls_name, expect):
    """``"softcap"`` only for the head followed directly by Gemma's soft-cap block and nothing
    else touching the logits; RecurrentGemma (``logits_soft_cap``), Cohere (logit scale) and
    the two variants above are ``None``: they keep their own loss."""
    import transformers

    from plugtune.modeling import head_forward, plain_head_forward

    cls = getattr(transformers, cls_name) if isinstance(cls_name, str) else cls_name
    assert head_forward(cls, "lm_head") == expect
    assert plain_head_forward(cls, "lm_head") == (expect == "plain")


def test_label_only_loss_applies_gemma2_softcap():
    """A tiny Gemma 2 (logits beyond its soft cap of 2): the label-only head is kept after its
    one-row check and equals the model's own loss; the uncapped head would not."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from plugtune.modeling import _label_only, _label_only_parts

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=2.0, initializer_range=1.0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    batch, _ = _packed_batch()
    got = loss_from_batch(model, batch)
    assert model._plugtune_label_only_head is True
    ref = model(**batch, use_cache=False).loss
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    parts = _label_only_parts(model, batch)
    with torch.no_grad():
        uncapped = _label_only(parts[1], parts[2], {**batch, "use_cache": False})
    assert abs(float(uncapped) - float(ref.detach())) > 0.1
