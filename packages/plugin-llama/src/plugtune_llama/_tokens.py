"""Pad and stop tokens of the Llama 2 / Llama 3.x, Qwen2 / Qwen2.5 and BLOOM tokenizers.

Pad: a tokenizer whose pad token is missing or equal to a stop token (EOS / end-of-turn) gets a
dedicated pad that already exists in its vocabulary, so no embedding is added and padding can
never be confused with the token the model must learn to emit. plugtune's collator pads labels
with -100 from the features (never ``input_ids == pad``), so even ``pad == eos`` keeps EOS trained;
the dedicated pad also protects code outside plugtune that masks labels by the pad id.

Stops: core's ``probe_template`` already finds the end-of-turn token a chat template emits
(``<|eot_id|>`` for Llama 3.x, ``<|im_end|>`` for Qwen2.5, checked with the real tokenizers).
What it cannot see are the *other* tokens the official checkpoints stop on: Llama 3.1+'s
``generation_config.json`` lists ``eos_token_id: [128001, 128008, 128009]`` (``<|end_of_text|>``,
``<|eom_id|>``, ``<|eot_id|>``) and Qwen2.5-Instruct's lists ``[151645, 151643]``
(``<|im_end|>``, ``<|endoftext|>``). A tiny or re-saved model lacks that generation config, so
the plugin adds them at generation time (those absent from the vocabulary are skipped).
"""

from __future__ import annotations

import logging

from plugtune.modeling import ensure_pad_token

log = logging.getLogger(__name__)

#: Pad candidates per family, first found in the vocabulary wins. Sources: Llama 3.1+
#: ``tokenizer_config.json`` names id 128004 ``<|finetune_right_pad_id|>`` (Meta's
#: llama-models ``tokenizer.py``: "used for padding in fine-tuning"); Llama 3.0 has only
#: ``<|reserved_special_token_*|>``; Llama 2 / stories260K have ``<unk>``; BLOOM has ``<pad>``
#: (id 3). Qwen2 tokenizers ship ``pad_token = <|endoftext|>`` and keep it.
PAD_CANDIDATES: dict[str, tuple[str, ...]] = {
    "llama": ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<unk>"),
    "qwen2": (),
    "bloom": ("<pad>", "<unk>"),
}

#: Extra generation stop tokens per family (see module docstring for the sources).
STOP_TOKENS: dict[str, tuple[str, ...]] = {
    "llama": ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    "qwen2": ("<|im_end|>", "<|endoftext|>"),
    "bloom": (),
}


def stop_ids(tokenizer, family: str) -> set[int]:
    """Ids that end a response for ``family``: EOS plus :data:`STOP_TOKENS` in the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in STOP_TOKENS.get(family, ()) if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def set_family_pad(tokenizer, family: str) -> str | None:
    """Give ``tokenizer`` a pad token that is not a stop token, when its vocabulary has one.

    Modifies ``tokenizer`` in place (``pad_token``); falls back to core's
    :func:`plugtune.modeling.ensure_pad_token` (``unk``, else ``eos``) when no candidate exists.

    Returns:
        The pad token string now set (``None`` if the tokenizer has neither pad, unk nor eos).
    """
    stops = stop_ids(tokenizer, family)
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stops:
        vocab = tokenizer.get_vocab()
        for cand in PAD_CANDIDATES.get(family, ()):
            tid = vocab.get(cand)
            if tid is not None and tid not in stops:
                if tokenizer.pad_token is not None:
                    log.info("pad token %r is a stop token; padding with %r (id %d) instead",
                             tokenizer.pad_token, cand, tid)
                tokenizer.pad_token = cand
                break
    ensure_pad_token(tokenizer)
    return tokenizer.pad_token
