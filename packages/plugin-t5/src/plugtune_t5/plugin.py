"""plugtune-t5: FLAN-T5 / T5 / mT5 / UMT5 sequence-to-sequence fine-tuning (hook impls only).

Family quirks handled here (helpers beside this file):

* loading as ``AutoModelForSeq2SeqLM`` with the numeric policy of :mod:`plugtune_t5._policy`
  (never fp16: bf16 where CUDA has it, else fp32; fp16 requests warn and fall back),
* LoRA targets ``q``,``v`` (auto) / every Linear but ``lm_head`` (all-linear),
* collation with ``-100``-padded labels and no packing (:mod:`plugtune_t5._collate`),
* a loss normalised per label token across gradient accumulation (:mod:`plugtune_t5._loss`),
* encoder-decoder generation honouring ``max_new_tokens`` (:mod:`plugtune_t5._generate`).
"""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.spec import Family, Loaded

FAMILIES = [Family("t5", ("t5", "mt5", "umt5"), "seq2seq", "FLAN-T5 small..XXL, mT5, UMT5")]
MODEL_TYPES = frozenset(FAMILIES[0].model_types)


def _ours(spec) -> bool:
    return spec.model_type in MODEL_TYPES or spec.family.name == "t5"


@hookimpl
def plugtune_families():
    return FAMILIES


@hookimpl
def plugtune_load(spec):
    """Tokenizer (right padding, pad = ``<pad>`` id 0) + ``AutoModelForSeq2SeqLM``.

    Applies :func:`plugtune_t5._policy.safe_dtype` and writes the result back into
    ``spec.torch_dtype``, so the Trainer's mixed-precision flags follow the safe dtype.
    """
    from plugtune_t5._policy import kbit_quantization_config, safe_dtype

    if not _ours(spec):
        return None
    from transformers import AutoModelForSeq2SeqLM

    from plugtune.modeling import ModelLoadError, load_model, load_tokenizer

    dtype = safe_dtype(spec)
    spec.torch_dtype = dtype
    tokenizer = load_tokenizer(spec, padding_side="right")
    kwargs = {}
    qc = kbit_quantization_config(spec, dtype)
    if qc is not None:
        kwargs.update(quantization_config=qc, dtype=dtype)
    model = load_model(spec, auto_class=AutoModelForSeq2SeqLM, **kwargs)
    cfg = model.config
    if cfg.decoder_start_token_id is None:  # T5 starts decoding from the pad token
        cfg.decoder_start_token_id = cfg.pad_token_id
    if tokenizer.pad_token_id is not None and cfg.pad_token_id != tokenizer.pad_token_id:
        raise ModelLoadError(f"{spec.path}: tokenizer pad id {tokenizer.pad_token_id} differs from the "
                         f"model's pad_token_id {cfg.pad_token_id}; use the model's own tokenizer")
    return Loaded(model=model, tokenizer=tokenizer)


@hookimpl
def plugtune_target_modules(spec, model, method):
    from plugtune_t5 import _targets

    if not _ours(spec):
        return None
    if method == "auto":
        return list(_targets.AUTO)
    if method == "all-linear":
        return _targets.all_linear(model)
    return _targets.explicit(model, method)


@hookimpl
def plugtune_collate(spec, tokenizer):
    import torch

    from plugtune_t5._collate import Seq2SeqCollator

    if not _ours(spec):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Seq2SeqCollator(pad_token_id=pad, padding_side="right",
                           pad_to_multiple_of=8 if torch.cuda.is_available() else None)


@hookimpl
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    from plugtune_t5._loss import seq2seq_loss

    if not _ours(spec):
        return None
    return seq2seq_loss(model, batch, num_items_in_batch)


@hookimpl
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    from plugtune_t5._generate import generate_seq2seq

    if not _ours(spec):
        return None
    gen = spec.recipe.generation
    kwargs = {}
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    return generate_seq2seq(model, tokenizer, prompts, max_new_tokens,
                            max_source_len=spec.recipe.sequence_len, do_sample=gen.do_sample,
                            **kwargs)
