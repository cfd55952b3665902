"""Image-token expansion, label masks, length policy and collation, per family.

Tiny random models, the real Llama 3.2 / Qwen2.5 tokenizers, the real images of
../shared/data (LLaMA-Factory's mllm_demo, scikit-image captions).
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import MODEL_TYPES, caption_image, demo_image, tokenizer_for

from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import IGNORE_INDEX, probe_template

TWO_IMAGE_CHAT = {
    "messages": [
        {"role": "user", "content": "<image>Who are they?"},
        {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
        {"role": "user", "content": "What are they doing?<image>"},
        {"role": "assistant", "content": "They are celebrating on the soccer field."},
    ],
}
TEXT_ONLY = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                          {"role": "assistant", "content": "4"}], "images": []}


def _setup(model_type: str):
    from plugtune_vision.tiny import tiny_processor

    tok = tokenizer_for(model_type)
    proc = tiny_processor(model_type, tok)
    ensure_chat_template(tok, None)
    return tok, proc, probe_template(tok)


@functools.cache
def _model(model_type: str):
    from plugtune_vision.tiny import tiny_model

    return tiny_model(model_type, tokenizer_for(model_type))


def _encode(model_type, example, max_len=1024, policy="prompt_then_drop"):
    from plugtune_vision._encode import encode_example
    from plugtune_vision._processors import FAMILIES

    tok, proc, info = _setup(model_type)
    return encode_example(proc, tok, FAMILIES[model_type], example, max_len, info,
                          policy=policy), tok, proc


def _two_image_example():
    return {**TWO_IMAGE_CHAT, "images": [demo_image("1.jpg"), demo_image("2.jpg")]}


def _image_ids(model_type, tok, proc) -> set[int]:
    """Every token id the stock processor marks as an image token, plus the placeholder's."""
    from plugtune_vision._processors import FAMILIES

    ids = {i for i in proc.image_token_ids if i is not None}
    ids |= set(tok(FAMILIES[model_type].placeholder, add_special_tokens=False)["input_ids"])
    if model_type == "smolvlm":  # tile tags and the global-view tag
        ids |= set(tok.convert_tokens_to_ids(list(FAMILIES[model_type].extra_tokens)))
    if model_type == "gemma3":
        ids |= {tok.convert_tokens_to_ids("<end_of_image>")}
    return ids


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_expansion_matches_the_stock_processor_and_labels_train_only_responses(model_type):
    from plugtune_vision._encode import with_placeholders
    from plugtune_vision._images import open_image
    from plugtune_vision._processors import FAMILIES

    ex = _two_image_example()
    row, tok, proc = _encode(model_type, ex)
    assert row["status"] == "kept" and row["images"] == ex["images"]
    # the same conversation through the model's own processor gives the same ids: the token
    # count after image expansion is known at encode time, before any truncation
    text = tok.apply_chat_template(with_placeholders(ex["messages"], FAMILIES[model_type]),
                                   tokenize=False)
    imgs = [open_image(p) for p in ex["images"]]
    kwargs = {"images": [imgs]} if model_type == "mllama" else {"images": imgs}
    stock = proc(text=[text], add_special_tokens=False, **kwargs)["input_ids"][0]
    stock = stock.tolist() if hasattr(stock, "tolist") else list(stock)
    n = len(row["input_ids"])
    assert stock[:n] == row["input_ids"]
    assert not "".join(tok.convert_ids_to_tokens(stock[n:])).strip(), "only whitespace may follow"
    # labels: exactly the two assistant responses, each with its end-of-turn token
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(row["input_ids"], row["labels"]))
    eot = probe_template(tok).end_of_turn or tok.eos_token
    assert tok.decode(trained) == (f"They're Kane and Gretzka from Bayern Munich.{eot}"
                                   f"They are celebrating on the soccer field.{eot}")
    image_ids = _image_ids(model_type, tok, proc)
    n_image_tokens = sum(t in image_ids for t in row["input_ids"])
    assert n_image_tokens >= 2
    assert not image_ids & set(trained), "an image token is trained"
    if model_type != "mllama":  # one token per image for mllama (cross-attention)
        assert n_image_tokens > 2 * 3, "images were not expanded"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mixed_text_only_and_multi_image_batch(model_type):
    from plugtune_vision._collate import VisionCollator
    from plugtune_vision._processors import FAMILIES

    two, tok, proc = _encode(model_type, _two_image_example())
    caption, _, _ = _encode(model_type, {
        "messages": [{"role": "user", "content": "<image>Describe this image."},
                     {"role": "assistant", "content": "a rocket standing on a launchpad"}],
        "images": [caption_image("rocket.jpg")]})
    text, _, _ = _encode(model_type, TEXT_ONLY)
    assert text["images"] == []
    rows = [two, text, caption]
    fam = FAMILIES[model_type]
    batch = VisionCollator(proc, tok.pad_token_id, fam.collate,
                           token_types_key=fam.token_types_key)(rows)
    ids = batch["input_ids"]
    assert ids.shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(text["input_ids"])
    image_ids = _image_ids(model_type, tok, proc)
    is_img = torch.isin(ids, torch.tensor(sorted(image_ids)))
    assert not is_img[1].any()
    assert not (batch["labels"][is_img] != IGNORE_INDEX).any()
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        grid = batch["image_grid_thw"]
        assert grid.shape == (3, 3)  # three images, in row order
        merge = proc.image_processor.merge_size ** 2
        pads = (ids == proc.image_token_id).sum(1)
        assert pads.tolist() == [int(grid[:2].prod(1).sum()) // merge, 0, int(grid[2].prod()) // merge]
        assert batch["pixel_values"].shape[0] == int(grid.prod(1).sum())
        assert torch.equal(batch["mm_token_type_ids"].bool(), ids == proc.image_token_id)
    elif model_type == "molmo2":
        assert batch["image_grids"].shape == (3, 4) and batch["image_num_crops"].shape == (3,)
        assert batch["mm_token_type_ids"][1].sum() == 0
        assert batch["mm_token_type_ids"][0].sum() == is_img[0].sum()  # <|image|> is replaced
    elif model_type == "qwen3_vl":
        grid = batch["image_grid_thw"]
        merge = proc.image_processor.merge_size ** 2
        pads = (ids == proc.image_token_id).sum(1)
        assert pads.tolist() == [int(grid[:2].prod(1).sum()) // merge, 0, int(grid[2].prod()) // merge]
        assert batch["pixel_values"].shape == (int(grid.prod(1).sum()), 3 * 2 * 16 * 16)
    elif model_type == "gemma3":  # one 32x32 image per <start_of_image>, 4 soft tokens each
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and "mm_token_type_ids" not in batch
        soft = ids == tok.convert_tokens_to_ids("<image_soft_token>")
        assert torch.equal(batch["token_type_ids"].bool(), soft)
        assert soft.sum(1).tolist() == [8, 0, 4]
    elif model_type == "smolvlm":  # tiles of every image in one padded list, in row order
        tags = ids == tok.convert_tokens_to_ids("<fake_token_around_image>")
        groups = int(tags.sum()) - 2 * 3  # each image's tag run ends with one closing tag ...
        n_tiles = batch["pixel_values"].shape[1]
        assert batch["pixel_values"].shape == (1, n_tiles, 3, 32, 32)
        assert (ids == proc.image_token_id).sum() == 4 * n_tiles  # image_seq_len per tile
        assert groups + 3 == n_tiles  # ... so tags - closing = tiles incl. the global views
    else:  # mllama: per-row images, tiles and the cross-attention mask
        b, n_img, tiles = batch["aspect_ratio_mask"].shape
        assert (b, n_img) == (3, 2) and batch["pixel_values"].shape[:3] == (3, 2, tiles)
        cam = batch["cross_attention_mask"]
        assert cam.shape == (3, ids.shape[1], 2, tiles)
        assert cam[1].sum() == 0 and batch["aspect_ratio_mask"][1].sum() == 0
        first, second = (ids[0] == proc.image_token_id).nonzero().flatten().tolist()
        assert cam[0, :first].sum() == 0 and cam[0, first:second, 0].any() and cam[0, second:, 1].any()
        assert cam[2, :, 1].sum() == 0  # one image in the caption row
    out = _model(model_type)(**batch, use_cache=False)
    assert math.isfinite(float(out.loss))


def _long_prompt(image_first: bool, n_words: int = 80) -> dict:
    words = " ".join(f"w{i}" for i in range(n_words))
    user = f"<image>{words}" if image_first else f"{words} <image>What is this?"
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": "a horse"}],
            "images": [caption_image("horse.png")]}


@pytest.mark.parametrize("model_type", ["qwen2_vl", "mllama"])
def test_length_policy_never_cuts_inside_image_tokens(model_type):
    full, tok, proc = _encode(model_type, _long_prompt(image_first=False))
    n = full["length"]
    image_ids = _image_ids(model_type, tok, proc)
    n_img = sum(t in image_ids for t in full["input_ids"])
    cut, _, _ = _encode(model_type, _long_prompt(image_first=False), max_len=n - 20)
    assert cut["status"] == "truncated" and cut["length"] == n - 20
    assert sum(t in image_ids for t in cut["input_ids"]) == n_img
    assert cut["input_ids"][-10:] == full["input_ids"][-10:] and cut["labels"][-10:] == full["labels"][-10:]
    assert cut["images"] == full["images"]
    # the image sits right after the system header: cutting 60 prompt tokens would split it
    first, _, _ = _encode(model_type, _long_prompt(image_first=True))
    dropped, _, _ = _encode(model_type, _long_prompt(image_first=True), max_len=first["length"] - 60)
    assert dropped["status"] == "dropped" and dropped["input_ids"] == [] and dropped["images"] == []
    strict, _, _ = _encode(model_type, _long_prompt(image_first=False), max_len=n - 20, policy="drop")
    assert strict["status"] == "dropped"


def test_prepare_counts_dropped_and_truncated_samples(tmp_path):
    from plugtune.config import validate_recipe
    from plugtune.data.pipeline import hook_encoder, prepare
    from plugtune.testing import make_spec
    from plugtune_vision.tiny import tiny_processor

    # kept / truncated (20 prompt tokens before the image go) / dropped (the cut would reach
    # into the image, which sits right after the system header)
    records = [_long_prompt(False), _long_prompt(True, n_words=140),
               {"messages": [{"role": "user", "content": "<image>Name it."},
                             {"role": "assistant", "content": "a horse"}],
                "images": [caption_image("horse.png")]}]
    data = tmp_path / "vision.json"
    data.write_text(json.dumps(records))
    full, _, _ = _encode("qwen2_vl", _long_prompt(False))
    recipe = validate_recipe({"base_model": "tiny", "sequence_len": full["length"] - 20,
                              "datasets": [{"path": str(data), "type": "vision"}]})
    spec, pm = make_spec("qwen2_vl")
    tok = tokenizer_for("qwen2_vl")
    proc = tiny_processor("qwen2_vl", tok)
    prepared = prepare(recipe, tok, "vision", encode=hook_encoder(pm, spec, proc, tok))
    s = prepared.stats
    assert (s["samples"], s["kept"], s["truncated"], s["dropped"], s["rows"]) == (3, 1, 1, 1, 2)
    assert all(len(r["images"]) == 1 for r in prepared.train)


def test_text_family_refuses_image_samples(tmp_path):
    from plugtune.config import validate_recipe
    from plugtune.data.loading import DataError
    from plugtune.data.pipeline import prepare

    data = tmp_path / "vision.json"
    data.write_text(json.dumps([{**TWO_IMAGE_CHAT,
                                 "images": [demo_image("1.jpg"), demo_image("2.jpg")]}]))
    recipe = validate_recipe({"base_model": "tiny",
                              "datasets": [{"path": str(data), "type": "vision"}]})
    with pytest.raises(DataError, match="text-only"):
        prepare(recipe, tokenizer_for("qwen2_vl"), "causal")
    with pytest.raises(DataError, match="processor"):
        prepare(recipe, tokenizer_for("qwen2_vl"), "vision")


def test_missing_or_unreadable_image_names_sample_and_path(tmp_path):
    from plugtune.data.loading import DataError
    from plugtune_vision._images import ImageError

    gone = tmp_path / "gone.jpg"
    ex = {"messages": [{"role": "user", "content": "<image>Who is he?"},
                       {"role": "assistant", "content": "a player"}], "images": [str(gone)]}
    with pytest.raises(ImageError, match=r"sample '<image>Who is he\?'.*gone\.jpg.*does not exist"):
        _encode("qwen2_vl", ex)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageError, match=r"Who is he.*cannot read image .*bad\.jpg"):
        _encode("qwen2_vl", {**ex, "images": [str(bad)]})
    # at load time the vision format names the record, the field and the path
    from plugtune.config import DatasetConfig
    from plugtune.data.loading import to_canonical

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{**ex, "images": ["nested/missing.png"]}]))
    with pytest.raises(DataError, match=r"d\.json record 0: field 'images\[0\]'.*nested/missing\.png"):
        to_canonical(DatasetConfig(path=str(data), type="vision"))
    data.write_text(json.dumps([{**ex, "images": []}]))
    with pytest.raises(DataError, match="0 image.*1 <image> placeholder"):
        to_canonical(DatasetConfig(path=str(data), type="vision"))


def _real(paths):
    """Compare image paths after resolving symlinks (../shared may be a link)."""
    import os

    return [os.path.realpath(p) for p in paths]


def test_vision_dataset_layouts_resolve_paths():
    from plugtune.config import DatasetConfig
    from plugtune.data.loading import to_canonical
    from plugtune.testing import shared_path

    demo, _ = to_canonical(DatasetConfig(path=str(shared_path("llama_factory", "mllm_demo.json")),
                                         type="vision"))
    assert len(demo) == 6
    assert _real(demo[0]["images"]) == _real([demo_image("1.jpg"), demo_image("1.jpg")])
    caps, _ = to_canonical(DatasetConfig(
        path=str(shared_path("vision", "skimage_clip_captions", "captions.json")), type="vision"))
    assert len(caps) == 8
    assert caps[1]["messages"][0]["content"] == "<image>Describe this image."
    assert caps[1]["messages"][1]["content"] == "a facial photo of a tabby cat"
    assert _real(caps[1]["images"]) == _real([caption_image("chelsea.png")])
