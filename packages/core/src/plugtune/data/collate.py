"""The generic collate function (picklable: a class, not a closure)."""

from __future__ import annotations

import torch

from plugtune.data.tokenize import IGNORE_INDEX


class Collator:
    """Pad tokenized features into tensors of shape ``(batch, seq)``.

    * ``input_ids`` are padded with ``pad_token_id``; ``labels`` with ``-100`` (never the pad
      id, so an EOS that doubles as pad stays a trained label).
    * Unpacked features get an ``attention_mask`` (1 = real token).
    * Packed features (with ``position_ids``) get *no* attention mask: the pad tail becomes one
      more pseudo-sample whose ``position_ids`` restart at 0, so transformers' packed-sequence
      masking (or flash-attn varlen) keeps every sample, and the padding, to itself.
    * Encoder-decoder features (``labels`` of a different length than ``input_ids``) pad
      labels to their own longest length; the model builds ``decoder_input_ids`` from them.

    Args:
        pad_token_id: id used for padding ``input_ids``.
        padding_side: ``"right"`` for training (default) or ``"left"``.
        pad_to_multiple_of: round the padded length up (8 helps tensor cores on GPUs).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _target(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    def _pad(self, seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
        return out

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        length = self._target(max(len(x) for x in ids))
        batch = {"input_ids": self._pad(ids, self.pad_token_id, length)}
        packed = "position_ids" in features[0]
        if "labels" in features[0]:
            labels = [list(f["labels"]) for f in features]
            seq2seq = any(len(lab) != len(x) for lab, x in zip(labels, ids))
            lab_len = self._target(max(len(x) for x in labels)) if seq2seq else length
            batch["labels"] = self._pad(labels, IGNORE_INDEX, lab_len)
        if packed:
            pos = []
            for f in features:
                p = list(f["position_ids"])
                pos.append(p + list(range(length - len(p))))
            batch["position_ids"] = torch.as_tensor(pos, dtype=torch.long)
        else:
            batch["attention_mask"] = self._pad([[1] * len(x) for x in ids], 0, length)
        return batch
