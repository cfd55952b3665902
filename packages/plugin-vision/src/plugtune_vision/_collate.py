"""Collation of image + text rows through each model's image processor (picklable classes)."""

from __future__ import annotations

from typing import Any

import torch

from plugtune.data.collate import Collator
from plugtune_vision._images import open_image
from plugtune_vision._processors import image_kwargs


class VisionCollator:
    """Pad token rows with core's :class:`~plugtune.data.collate.Collator` and add the pixels.

    Each feature holds ``input_ids``, optionally ``labels``, and ``images`` (paths or PIL
    images, possibly empty: text-only and image samples mix in one batch).

    * ``mode="flat"`` (Qwen2-VL, Qwen2.5-VL, Molmo2): all images of the batch, in row order, go
      through ``processor.image_processor`` at once; its outputs are added unchanged
      (``pixel_values`` + ``image_grid_thw`` for Qwen2-VL, shape ``(sum patches, C*T*P*P)`` and
      ``(n_images, 3)``; ``pixel_values``, ``image_token_pooling``, ``image_grids``,
      ``image_num_crops`` for Molmo2; ``pixel_values`` ``(n_images, 3, H, W)`` for Gemma 3 and
      LLaVA; ``pixel_values`` ``(1, n_tiles, 3, H, W)`` + ``pixel_attention_mask`` for SmolVLM /
      Idefics3, whose tiles of every image in the batch are one padded list that the model
      scatters into the ``<image>`` tokens in order). The per-token modality ids ``(batch,
      seq)`` (1 on image tokens) come from ``processor.create_mm_token_type_ids`` when the
      processor returns them, under ``token_types_key`` (Qwen-VL's M-RoPE needs them, Molmo2
      requires them for training; Gemma 3 reads them as ``token_type_ids`` for its
      bidirectional attention inside each image).
    * ``mode="mllama"``: per-row image lists; ``pixel_values`` ``(batch, max_images,
      max_tiles, 3, H, W)``, ``aspect_ratio_ids`` ``(batch, max_images)``,
      ``aspect_ratio_mask`` ``(batch, max_images, max_tiles)`` and ``cross_attention_mask``
      ``(batch, seq, max_images, max_tiles)`` built with the processor's own functions; rows
      without images get zeros (their text attends to no image).

    Args:
        processor: the family's ``transformers`` processor.
        pad_token_id: id used for padding ``input_ids``.
        mode: ``"flat"`` or ``"mllama"``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        token_types_key: batch key of the per-token modality ids (``"mm_token_type_ids"`` or
            ``"token_type_ids"``, see :class:`~plugtune_vision._processors.VisionFamily`).

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(self, processor, pad_token_id: int, mode: str = "flat",
                 padding_side: str = "right", token_types_key: str = "mm_token_type_ids"):
        if mode not in ("flat", "mllama"):
            raise ValueError(f"mode must be 'flat' or 'mllama', got {mode!r}")
        self.processor = processor
        self.mode = mode
        self.token_types_key = token_types_key
        self.text = Collator(pad_token_id=pad_token_id, padding_side=padding_side)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{k: f[k] for k in ("input_ids", "labels") if k in f} for f in features]
        batch = self.text(rows)
        images = [[open_image(p) for p in (f.get("images") or [])] for f in features]
        if self.mode == "mllama":
            self._mllama(batch, images)
        else:
            flat = [im for row in images for im in row]
            if flat:
                kwargs = {**image_kwargs(self.processor), "return_tensors": "pt"}
                kwargs.pop("return_row_col_info", None)  # only the expansion needs the tiling
                out = self.processor.image_processor(flat, **kwargs)
                unused = set(getattr(self.processor, "unused_input_names", ()) or ())
                batch.update({k: v for k, v in out.items()
                              if isinstance(v, torch.Tensor) and k not in unused})
            if getattr(self.processor, "return_mm_token_type_ids", False):
                types = self.processor.create_mm_token_type_ids(batch["input_ids"].tolist())
                batch[self.token_types_key] = torch.as_tensor(types, dtype=torch.long)
        return batch

    def _mllama(self, batch: dict, images: list[list]) -> None:
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        have = [i for i, row in enumerate(images) if row]
        if not have:
            return
        ip = self.processor.image_processor
        out = ip([images[i] for i in have], return_tensors="pt")
        n_batch = batch["input_ids"].shape[0]
        pv = out["pixel_values"]
        pixel = torch.zeros((n_batch, *pv.shape[1:]), dtype=pv.dtype)
        ar_ids = torch.zeros((n_batch, pv.shape[1]), dtype=torch.long)
        ar_mask = torch.zeros((n_batch, pv.shape[1], pv.shape[2]), dtype=torch.long)
        tiles: list[list[int]] = [[] for _ in range(n_batch)]
        num_tiles = out["num_tiles"]
        for j, i in enumerate(have):
            pixel[i] = pv[j]
            ar_ids[i] = out["aspect_ratio_ids"][j]
            ar_mask[i] = out["aspect_ratio_mask"][j]
            nt = num_tiles[j]
            tiles[i] = [int(t) for t in (nt.tolist() if hasattr(nt, "tolist") else nt)]
        ids = batch["input_ids"].tolist()
        token_masks = [get_cross_attention_token_mask(r, self.processor.image_token_id) for r in ids]
        cam = convert_sparse_cross_attention_mask_to_dense(
            token_masks, tiles, max_num_tiles=ip.max_image_tiles, length=len(ids[0]))
        batch.update(pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                     cross_attention_mask=torch.as_tensor(cam, dtype=torch.long))
