"""Label padding with -100 (never pad id 0), decoder inputs from labels, the GA-correct loss."""

from __future__ import annotations

import pickle

import pytest
import torch

from plugtune.data.tokenize import tokenize_seq2seq
from plugtune.testing import make_spec
from plugtune_t5._loss import seq2seq_loss
from plugtune_t5.tiny import tiny_t5

PAIRS = [
    ("Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)",
     "Amanda baked cookies and will bring Jerry some tomorrow."),
    ("Tom: late\nAnna: ok", "Tom is late."),
    ("Olivia: Who are you voting for in this election?\nOliver: Liberals as always.",
     "Olivia and Olivier are voting for liberals in this election."),
]


@pytest.fixture
def spec_pm():
    return make_spec("t5")


@pytest.fixture
def features(t5_tokenizer):
    return [tokenize_seq2seq(t5_tokenizer, s, t, 128) for s, t in PAIRS]


def test_labels_padded_with_minus_100_not_pad_id(spec_pm, t5_tokenizer, features):
    spec, pm = spec_pm
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=t5_tokenizer)
    batch = collate(features)
    assert t5_tokenizer.pad_token_id == 0
    n_src = max(len(f["input_ids"]) for f in features)
    n_tgt = max(len(f["labels"]) for f in features)
    assert batch["input_ids"].shape == (3, n_src) and batch["labels"].shape == (3, n_tgt)
    for i, f in enumerate(features):
        k, n = len(f["labels"]), len(f["input_ids"])
        assert batch["labels"][i, :k].tolist() == f["labels"]
        assert (batch["labels"][i, k:] == -100).all()
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert (batch["input_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].sum() == n
    assert not (batch["labels"] == 0).any(), "a pad id (0) leaked into the labels"
    assert (batch["labels"] == t5_tokenizer.eos_token_id).sum() == 3, "every target ends with EOS"
    again = pickle.loads(pickle.dumps(collate))
    assert torch.equal(again(features)["labels"], batch["labels"])


def test_packed_rows_are_refused(spec_pm, t5_tokenizer, features):
    spec, pm = spec_pm
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=t5_tokenizer)
    packed = [dict(f, position_ids=list(range(len(f["input_ids"])))) for f in features]
    with pytest.raises(ValueError, match="sample_packing"):
        collate(packed)


def test_decoder_inputs_come_from_labels(spec_pm, t5_tokenizer, features):
    spec, pm = spec_pm
    model = tiny_t5().eval()
    batch = pm.hook.plugtune_collate(spec=spec, tokenizer=t5_tokenizer)(features)
    dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert (dec[:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(dec[:, 1:][batch["labels"][:, :-1] != -100],
                       batch["labels"][:, :-1][batch["labels"][:, :-1] != -100])
    assert not (dec == -100).any()
    with torch.no_grad():
        ours = pm.hook.plugtune_train_step(spec=spec, model=model, batch=batch,
                                           num_items_in_batch=None)
        hf = model(**batch).loss  # transformers' own mean over label tokens
    assert torch.allclose(ours, hf, atol=1e-5)


def test_loss_is_normalised_across_gradient_accumulation(t5_tokenizer, features):
    """Two micro-batches with num_items_in_batch = all label tokens sum to the full-batch mean
    (T5's own per-micro-batch mean would weight the 1-row batch as much as the 2-row one)."""
    spec, pm = make_spec("t5")
    model = tiny_t5().eval()
    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=t5_tokenizer)
    full = collate(features)
    n = int((full["labels"] != -100).sum())
    with torch.no_grad():
        whole = seq2seq_loss(model, full)
        parts = seq2seq_loss(model, collate(features[:2]), n) + seq2seq_loss(
            model, collate(features[2:]), torch.tensor(n))
        naive = (model(**collate(features[:2])).loss + model(**collate(features[2:])).loss) / 2
    assert torch.allclose(parts, whole, atol=1e-5)
    assert not torch.allclose(naive, whole, atol=1e-3)
