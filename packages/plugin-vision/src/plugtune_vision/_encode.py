"""Tokenization of image + chat samples with image-token expansion and label masks.

One sample goes through the same steps as core's text path (``plugtune.data.tokenize``), with
the images spliced in before tokenization:

1. every ``<image>`` placeholder in the messages becomes the family's placeholder text (what its
   own chat template renders for an image, e.g. ``<|vision_start|><|image_pad|><|vision_end|>``);
2. the conversation is rendered into ``(text, trainable)`` segments by core's
   :func:`~plugtune.data.tokenize.render_segments` (prompt/response boundaries of the template);
3. the n-th occurrence of the processor's ``image_token`` is replaced by
   ``processor.replace_image_token`` for the n-th image (the stock expansion: Qwen2-VL
   ``grid_t*grid_h*grid_w / merge_size**2`` pads, Molmo2's low-res + high-res patch/column
   layout, Mllama's single ``<|image|>``), so the token count after expansion is known here;
4. the text is tokenized once with offsets (:func:`~plugtune.data.tokenize.tokenize_segments`);
   labels are ``-100`` outside assistant turns and on every token of an image's expansion
   (each expansion is an untrained segment: masked by position, not by token id, so text such
   as Gemma's ``\\n\\n`` stays trained in responses);
5. an over-long row loses prompt tokens from the left only where no image token lies in the cut
   span (a row is never cut inside an image's tokens); otherwise it is dropped and counted.
"""

from __future__ import annotations

from typing import Any

from plugtune.data.formats import IMAGE_PLACEHOLDER
from plugtune.data.tokenize import IGNORE_INDEX, render_segments, tokenize_segments
from plugtune_vision._images import ImageError, describe_sample, open_image
from plugtune_vision._processors import VisionFamily


def image_expansion(processor, image) -> str:
    """The text that replaces ``processor.image_token`` for one RGB ``PIL`` image: the stock
    ``replace_image_token`` on the image processor's output for it (with the processor's default
    ``images_kwargs``, e.g. SmolVLM's row/column tiling info)."""
    from plugtune_vision._processors import image_kwargs

    inputs = processor.image_processor([image], **image_kwargs(processor))
    inputs = {k: (v.tolist() if hasattr(v, "tolist") and k != "pixel_values" else v)
              for k, v in inputs.items()}
    for key in ("image_grid_thw", "image_grids"):
        if key in inputs:
            import torch

            inputs[key] = torch.as_tensor(inputs[key])
    out = processor.replace_image_token(inputs, 0)
    return out if isinstance(out, str) else "".join(out)


def with_placeholders(messages: list[dict], fam: VisionFamily) -> list[dict]:
    """Messages with each ``<image>`` replaced by the family's placeholder text."""
    return [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, fam.placeholder)}
            for m in messages]


def expand_segments(segments: list[tuple[str, bool]], image_token: str,
                    expansions: list[str]) -> tuple[list[tuple[str, bool]], int]:
    """Replace the n-th ``image_token`` of the segment texts by ``expansions[n]``.

    Each expansion becomes its own untrained segment, so every token that starts inside an
    image's text (image tokens, Gemma 3's ``\\n\\n`` around them, SmolVLM's tile tags and row
    breaks) gets label ``-100`` by construction, whatever turn the image sits in.

    Returns:
        ``(segments, n_used)``. Raises ``ValueError`` when the texts hold more image tokens
        than there are expansions.
    """
    out, k = [], 0
    for text, train in segments:
        parts = text.split(image_token)
        out.append((parts[0], train))
        for rest in parts[1:]:
            if k >= len(expansions):
                raise ValueError(f"the rendered text holds more {image_token} tokens than "
                                 f"the {len(expansions)} image(s) of the sample")
            out += [(expansions[k], False), (rest, train)]
            k += 1
    return [(t, train) for t, train in out if t], k


def image_token_ids(tokenizer, fam: VisionFamily, expansions: list[str]) -> set[int]:
    """Ids of the special (added) tokens of the placeholder and expansion texts: the image
    tokens and their tags. Ordinary text inside an expansion (Gemma 3's ``\\n\\n``, SmolVLM's
    row breaks) is left out, so a response using the same text is never mistaken for an
    image."""
    text = fam.placeholder + "".join(dict.fromkeys(expansions))
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    return {t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t in added}


def fit_length(ids: list[int], labels: list[int], max_len: int, policy: str, keep_prefix: int,
               image_ids: set[int]) -> tuple[list[int], list[int], str]:
    """The length policy of :func:`plugtune.data.tokenize.apply_length_policy`, image-safe.

    ``prompt_then_drop`` removes prompt tokens after the ``keep_prefix`` BOS tokens only when
    the removed span holds no image token and no trained token; otherwise (and for ``drop``)
    an over-long row is dropped. Returns ``(ids, labels, status)``.
    """
    n = len(ids)
    if n <= max_len:
        return ids, labels, "kept"
    if policy == "prompt_then_drop":
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), n)
        excess = n - max_len
        cut = range(keep_prefix, keep_prefix + excess)
        if first - keep_prefix >= excess and not any(ids[i] in image_ids for i in cut):
            return (ids[:cut.start] + ids[cut.stop:], labels[:cut.start] + labels[cut.stop:],
                    "truncated")
    return [], [], "dropped"


def _bos_segment(tokenizer, fam: VisionFamily, text: str) -> str | None:
    if not fam.bos_from_eos:
        return None
    bos = tokenizer.bos_token or tokenizer.eos_token
    return None if not bos or text.startswith(bos) else bos


def encode_example(processor, tokenizer, fam: VisionFamily, example: dict, max_len: int,
                   template, train_on_inputs: bool = False,
                   policy: str = "prompt_then_drop") -> dict[str, Any]:
    """One canonical vision example -> ``plugtune_encode`` row (see module docstring).

    Raises:
        plugtune_vision._images.ImageError: an image is missing or unreadable (names the sample
            and the path).
        ValueError: placeholders and images disagree.
    """
    messages, paths = example["messages"], list(example.get("images") or [])
    sample = describe_sample(messages, paths)
    images = [open_image(p, sample) for p in paths]
    segments = render_segments(tokenizer, with_placeholders(messages, fam), template,
                               train_on_inputs)
    expansions = [image_expansion(processor, im) for im in images]
    try:
        segments, used = expand_segments(segments, processor.image_token, expansions)
    except ValueError as exc:
        raise ImageError(f"{sample}: {exc}") from None
    bos = _bos_segment(tokenizer, fam, segments[0][0])
    if bos:
        segments = [(bos, False), *segments]
    ids, labels = tokenize_segments(tokenizer, segments, template)
    img_ids = image_token_ids(tokenizer, fam, expansions)
    keep = 1 if ids and (bos or (template.bos_id is not None and ids[0] == template.bos_id)) else 0
    ids, labels, status = fit_length(list(ids), labels, max_len, policy, keep, img_ids)
    return {"input_ids": ids, "labels": labels, "length": len(ids), "status": status,
            "images": [str(p) for p in paths[:used]] if status != "dropped" else []}


def prompt_features(processor, tokenizer, fam: VisionFamily, messages: list[dict],
                    images: list) -> dict[str, Any]:
    """Generation input for one prompt: ``{"input_ids", "images"}`` (images as RGB PIL).

    ``messages`` end with a user turn; without any ``<image>`` placeholder the images are put
    before the first user text (the layout of the models' own chat templates).

    Raises:
        ImageError: placeholders and images disagree, or an image cannot be read.
    """
    messages = [dict(m) for m in messages]
    n_tags = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and n_tags == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first]["content"] = IMAGE_PLACEHOLDER * len(images) + messages[first]["content"]
    elif n_tags != len(images):
        raise ImageError(f"prompt has {n_tags} {IMAGE_PLACEHOLDER} placeholder(s) but "
                         f"{len(images)} image(s) were given")
    sample = describe_sample(messages, images)
    pil = [open_image(im, sample) for im in images]
    text = tokenizer.apply_chat_template(with_placeholders(messages, fam), tokenize=False,
                                         add_generation_prompt=True)
    expanded, _ = expand_segments([(text, False)], processor.image_token,
                                  [image_expansion(processor, im) for im in pil])
    text = "".join(t for t, _ in expanded)
    bos = _bos_segment(tokenizer, fam, text)
    if bos:
        text = bos + text
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=not has_bos and not bos)["input_ids"]
    return {"input_ids": ids, "images": pil}
