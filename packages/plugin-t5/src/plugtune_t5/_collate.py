"""The encoder-decoder collate function (a picklable class)."""

from __future__ import annotations

import torch

from plugtune.data.collate import Collator
from plugtune.data.tokenize import IGNORE_INDEX


class Seq2SeqCollator(Collator):
    """Pad encoder inputs and decoder labels of a T5 batch, each to its own longest length.

    Output (``B`` = batch size, ``S`` = longest source, ``T`` = longest target, each rounded up
    to ``pad_to_multiple_of``):

    * ``input_ids`` ``(B, S)`` padded with ``pad_token_id`` (T5: 0),
    * ``attention_mask`` ``(B, S)``, 1 on real tokens,
    * ``labels`` ``(B, T)`` padded with ``-100``, never with the pad id: T5's pad id 0 is also
      its decoder start token, and a pad-id label would be trained as a real token.

    There are no ``decoder_input_ids``: the model derives them from ``labels`` by shifting right
    and putting ``decoder_start_token_id`` first (``-100`` becomes pad), so they can never disagree.

    Raises:
        ValueError: packed features (``position_ids``): T5 has relative position buckets and
            no per-sample position reset, so packed rows would attend to each other.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Seq2SeqCollator got an empty batch")
        if "position_ids" in features[0]:
            raise ValueError("T5 (encoder-decoder) rows cannot be packed: set sample_packing: false")
        ids = [list(f["input_ids"]) for f in features]
        length = self._target(max(len(x) for x in ids))
        batch = {"input_ids": self._pad(ids, self.pad_token_id, length),
                 "attention_mask": self._pad([[1] * len(x) for x in ids], 0, length)}
        if "labels" in features[0]:
            labels = [list(f["labels"]) for f in features]
            batch["labels"] = self._pad(labels, IGNORE_INDEX,
                                        self._target(max(len(x) for x in labels)))
        return batch
