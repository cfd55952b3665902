"""Best-fit packing, no tail lost, and packed samples that never attend to each other."""

from __future__ import annotations

import random

import pytest
import torch

from plugtune.data.collate import Collator
from plugtune.data.packing import best_fit_decreasing, pack_rows
from plugtune.data.tokenize import IGNORE_INDEX


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_uses_every_item_once_and_respects_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500)), "no sample lost or duplicated (no tail dropped)"
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1, "best-fit should be within a few % of optimal"


def test_oversized_item_is_an_error():
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([10, 200], 128)


def test_pack_rows_positions_and_boundary_labels():
    ids = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    labels = [[IGNORE_INDEX, 5, 6], [1, 7], [IGNORE_INDEX, IGNORE_INDEX, 9, 10]]
    rows = pack_rows(ids, labels, 6)
    assert sum(rows["length"]) == 9
    for r_lab, r_pos in zip(rows["labels"], rows["position_ids"]):
        starts = [i for i, p in enumerate(r_pos) if p == 0]
        for s in starts:
            assert r_lab[s] == IGNORE_INDEX, "a sample's first token is never a target"


def test_collator_packed_pad_tail_is_its_own_segment():
    c = Collator(pad_token_id=0)
    batch = c([{"input_ids": [1, 2, 3, 1, 2], "labels": [-100, 2, 3, -100, 2], "position_ids": [0, 1, 2, 0, 1]},
               {"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]}])
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2]
    assert batch["labels"][1].tolist() == [-100, 2, -100, -100, -100]


def test_packed_logits_equal_each_sample_alone(make_tiny_llama):
    model = make_tiny_llama(vocab_size=100).eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (7, 12, 5, 9)]
    rows = pack_rows(samples, samples, 40)
    batch = Collator(pad_token_id=0)([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row_ids in enumerate(rows["input_ids"]):
            pos = rows["position_ids"][r]
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row_ids[a:b]]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, atol=1e-4, rtol=1e-4)


def test_use_cache_true_would_contaminate():
    """Guard for the trap in FINDINGS.md: our train step must pass use_cache=False."""
    from plugtune.modeling import loss_from_batch

    seen = {}

    class Spy(torch.nn.Module):
        config = type("C", (), {"is_encoder_decoder": False})()

        def forward(self, **kw):
            seen.update(kw)
            return type("O", (), {"loss": torch.tensor(0.0)})()

    loss_from_batch(Spy(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    assert seen["use_cache"] is False


def test_multipack_real_batches_false_packs_one_row_per_micro_batch():
    """axolotl's ``multipack_real_batches: false``: bins of micro_batch_size * sequence_len, fed
    one row per micro-batch: the same samples and tokens in fewer rows, none over the bin, no
    sample over sequence_len, and less padding than rows of sequence_len (real data: the
    stories260K tokenizer makes Alpaca samples long, so rows of 512 cannot be filled)."""
    from transformers import AutoTokenizer

    from plugtune.config import validate_recipe
    from plugtune.data import prepare
    from plugtune.testing import make_spec, shared_path
    from plugtune.trainer import training_kwargs

    tok_dir = shared_path("models", "stories260K", "hf")
    data = shared_path("llama_factory", "alpaca_en_demo.json")
    out = {}
    for real in (True, False):
        recipe = validate_recipe(dict(
            base_model=str(tok_dir), datasets=[dict(path=str(data), type="alpaca", max_samples=300)],
            chat_template="alpaca", sequence_len=512, micro_batch_size=4, sample_packing=True,
            multipack_real_batches=real, truncation="drop", output_dir="/tmp/unused"))
        out[real] = prepare(recipe, AutoTokenizer.from_pretrained(tok_dir), "causal")
        spec, _ = make_spec("causal_lm", sample_packing=True, multipack_real_batches=real,
                            micro_batch_size=4, output_dir="/tmp/unused")
        kw = training_kwargs(spec.recipe, spec, has_eval=True)
        assert kw["per_device_train_batch_size"] == (4 if real else 1)
        assert kw["per_device_eval_batch_size"] == (4 if real else 1)
    rows, long = out[True], out[False]
    for k in ("samples", "real_tokens", "trained_tokens"):
        assert long.stats[k] == rows.stats[k], k
    assert max(long.train["length"]) <= 4 * 512 and max(rows.train["length"]) <= 512
    assert long.stats["rows"] * 4 >= rows.stats["rows"] * 0.9 and long.stats["rows"] < rows.stats["rows"]
    for pos in long.train["position_ids"]:
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        assert max(b - a for a, b in zip(starts, starts[1:])) <= 512
    # padding per step: rows of 512 leave bins part-empty; one row per micro-batch pads nothing
    real_pad = 1 - rows.stats["real_tokens"] / (rows.stats["rows"] * 512)
    long_pad = 1 - long.stats["real_tokens"] / (long.stats["rows"] * 4 * 512)
    assert long_pad < real_pad and long.stats["pad_fraction"] == 0
