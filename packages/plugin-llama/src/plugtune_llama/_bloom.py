"""BLOOM / BLOOMZ quirks: eager attention, ALiBi and packed rows, fused target names.

* transformers' ``BloomForCausalLM`` supports neither sdpa nor flash-attn (``from_config(...,
  attn_implementation="sdpa")`` raises "does not support an attention implementation through
  torch.nn.functional.scaled_dot_product_attention"), so it is loaded with ``eager``.
* BLOOM has no position ids: ALiBi biases come from the 2-D attention mask and the causal mask
  ignores ``position_ids`` (``BloomModel.forward`` calls ``create_causal_mask`` without them). A
  packed row (core's packing: ``position_ids`` restarting at 0, no attention mask) would
  therefore let every sample attend to the samples packed before it (measured: max |logit
  difference| 3.5e-3 on a random tiny BLOOM vs each sample alone). :class:`UnpackingCollator`
  splits packed rows back into one padded row per sample with an attention mask, so packed data
  trains exactly like unpacked data (the same tokens and labels; the speed-up of packing is lost).
* The attention input projection is one fused Linear ``query_key_value``; the others are
  ``dense`` (attention output), ``dense_h_to_4h`` and ``dense_4h_to_h`` (the MLP). ``mlp`` is a
  ``BloomMLP`` container, not a Linear, and cannot be a LoRA target.
"""

from __future__ import annotations

from plugtune.data.collate import Collator

#: LoRA targets: ``auto`` = peft's default for bloom; ``all-linear`` = every Linear but lm_head.
AUTO_TARGETS = ("query_key_value",)
ALL_LINEAR = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def split_packed(feature: dict) -> list[dict]:
    """Split one packed row into its samples at every ``position_ids`` restart (value 0).

    Args:
        feature: ``{"input_ids", "labels", "position_ids", ...}``, lists of equal length.

    Returns:
        One ``{"input_ids", "labels"}`` dict per sample, in order.
    """
    pos = list(feature["position_ids"])
    starts = [i for i, p in enumerate(pos) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(pos)]
    ids, labels = list(feature["input_ids"]), list(feature["labels"])
    return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(bounds, bounds[1:]) if b > a]


class UnpackingCollator(Collator):
    """:class:`plugtune.data.collate.Collator` that turns packed rows into one row per sample.

    Unpacked features pass straight through. Output: ``input_ids``, ``labels``,
    ``attention_mask`` of shape ``(n_samples, longest_sample)``, right-padded; labels padded
    with -100. Picklable (a plain class).
    """

    def __call__(self, features: list[dict]):
        if features and "position_ids" in features[0]:
            features = [s for f in features for s in split_packed(f)]
        return super().__call__(features)
