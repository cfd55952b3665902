"""Token rows an adapter run must train: tokens added to the vocabulary and untrained stop tokens.

LoRA adapts linear layers only, so the embedding and output rows of a token are frozen. Two
kinds of tokens then never work:

* tokens *added* to the vocabulary (a named template's markers, ``chat_template: chatml`` on a
  base model, or the recipe's ``added_tokens``): their rows are fresh (random or mean) values;
* stop tokens (EOS, the template's end-of-turn) whose rows the base model never trained:
  llama2.c's stories260K gives ``</s>`` a probability of ~1e-12 at the end of a response, so
  under LoRA it never learns to stop (unsloth's ``fix_untrained_tokens`` targets the same
  problem, by zero-norm rows).

The rows of untrained stop tokens are first reset to the mean row (:func:`reset_rows`). Both
get their rows trained through PEFT's ``LoraConfig(trainable_token_indices=...)``
(``peft.tuners.trainable_tokens``): only those rows are trained, saved in the adapter
(``adapter_model.safetensors``) and restored by ``PeftModel.from_pretrained``, tied output
rows included. Recipe keys: ``added_tokens`` (list of strings, added as special tokens, e.g.
the mapping target of axolotl's ``tokens:``) and ``train_token_rows`` (default true).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

#: a stop token whose geometric-mean probability, at the positions where the training data
#: puts it, is below this is treated as untrained (stories260K: ~1e-12; a random-weight model
#: gives ~1/vocab; a trained chat model >1e-2)
UNTRAINED_PROB = 1e-6
#: an output row whose norm is below this share of the median row norm is untrained (zeros)
UNTRAINED_NORM_SHARE = 1e-3


def add_tokens(tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add ``tokens`` missing from ``tokenizer``'s vocabulary as special tokens (never split,
    kept whole by ``decode``). Returns the ones added; the caller resizes the embeddings
    (``model.resize_token_embeddings(len(tokenizer))``) and trains their rows
    (:func:`rows_to_train`).

    This is the one way plugtune adds tokens: named templates' markers and the recipe's
    ``added_tokens`` (config dialects map axolotl's ``tokens`` / LLaMA-Factory's
    ``new_special_tokens`` onto it) both come here.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    return missing


def untrained_stop_tokens(model, rows: Sequence[dict], stop_ids: Sequence[int], max_rows: int = 4,
                          max_len: int = 512) -> dict[int, float]:
    """Stop tokens whose rows the base model never trained (heuristic, documented above).

    A stop id is untrained when its output row has (almost) zero norm
    (< :data:`UNTRAINED_NORM_SHARE` of the median), or when the geometric mean of the model's
    probability for it, at the positions where the first ``max_rows`` training rows label it
    (one forward pass each, ``max_len`` tokens), is below :data:`UNTRAINED_PROB`.

    Args:
        model: the base causal LM (before the adapter is applied).
        rows: training rows with ``input_ids``, ``labels`` (unshifted) and maybe ``position_ids``.
        stop_ids: EOS and the end-of-turn id.

    Returns:
        ``{token_id: geometric-mean probability}`` for the untrained ones (0.0 for zero rows).
    """
    out: dict[int, float] = {}
    head = model.get_output_embeddings()
    if head is None or not stop_ids:
        return out
    norms = head.weight.detach().float().norm(dim=1)
    median = float(norms.median())
    for sid in stop_ids:
        if sid < len(norms) and float(norms[sid]) < UNTRAINED_NORM_SHARE * median:
            out[sid] = 0.0
    logps: dict[int, list[float]] = {s: [] for s in stop_ids if s not in out}
    used = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            labels = list(row["labels"])[:max_len]
            pos = [t - 1 for t, lab in enumerate(labels) if lab in logps and t > 0]
            if not pos:
                continue
            kw = {"input_ids": torch.tensor([list(row["input_ids"])[:max_len]], device=device)}
            if row.get("position_ids") is not None:
                kw["position_ids"] = torch.tensor([list(row["position_ids"])[:max_len]], device=device)
            with torch.no_grad():
                lp = model(**kw, use_cache=False).logits[0].float().log_softmax(-1)
            for p in pos:
                logps[labels[p + 1]].append(float(lp[p, labels[p + 1]]))
            used += 1
            if used >= max_rows:
                break
    finally:
        model.train(was_training)
    for sid, vals in logps.items():
        if vals and sum(vals) / len(vals) < math.log(UNTRAINED_PROB):
            out[sid] = math.exp(sum(vals) / len(vals))
    return out


def rows_to_train(model, tokenizer, added: Sequence[str], stop_ids: Sequence[int],
                  rows: Sequence[dict], enabled: bool = True) -> tuple[list[int], str]:
    """Token ids whose embedding/output rows the adapter run trains, and a one-line notice.

    Args:
        added: tokens added to the vocabulary for this run (template markers, ``added_tokens``).
        stop_ids: the template's stop ids (checked with :func:`untrained_stop_tokens`).
        rows: a few training rows (for the stop-token check).
        enabled: the recipe's ``train_token_rows`` (false: nothing trained, nothing reset).

    Returns:
        ``(sorted ids, notice)``; the notice is ``""`` when no row is trained.
    """
    if not enabled:
        return [], ""
    ids = {tokenizer.convert_tokens_to_ids(t): f"{t} (added)" for t in added}
    try:
        weak = untrained_stop_tokens(model, rows, stop_ids)
    except Exception as exc:  # e.g. sharded (ZeRO-3) weights: keep going without the check
        log.debug("untrained stop-token check skipped: %s", exc)
        weak = {}
    for sid, p in weak.items():
        ids.setdefault(sid, f"{tokenizer.convert_ids_to_tokens(sid)} (untrained: P={p:.1e} where "
                            "the data ends a response; row reset to the mean row)")
    reset_rows(model, list(weak))
    if not ids:
        return [], ""
    notice = ("training the embedding and output rows of " + ", ".join(ids[i] for i in sorted(ids))
              + " (set train_token_rows: false to keep them frozen)")
    return sorted(ids), notice


def reset_rows(model, ids: Sequence[int]) -> None:
    """Set the input-embedding and output rows of ``ids`` to the mean of all other rows (in
    place), so an untrained token starts from an average logit instead of ~25 nats below it
    (transformers' ``mean_resizing`` for new tokens; unsloth's ``fix_untrained_tokens``).
    From there a learning rate made for LoRA moves it within a run; from 1e-12 it does not."""
    if not ids:
        return
    idx = torch.tensor(sorted(set(ids)))
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    seen = set()
    with torch.no_grad():
        for layer in layers:
            if layer is None or id(layer.weight) in seen:
                continue
            seen.add(id(layer.weight))
            w = layer.weight
            keep = torch.ones(w.shape[0], dtype=torch.bool)
            keep[idx] = False
            w[idx.to(w.device)] = w[keep.to(w.device)].float().mean(0).to(w.dtype)


def trainable_token_indices(model, ids: Sequence[int], modules_to_save: Sequence[str] | None = None
                            ) -> dict[str, list[int]] | None:
    """``LoraConfig(trainable_token_indices=...)`` for ``ids``: the input embedding and, when
    the output layer is not tied to it, the output layer (peft ties a tied head itself).
    Layers already fully trained through ``modules_to_save`` are left out. ``None`` if empty."""
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    layers = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    skip = set(modules_to_save or ())
    result = {}
    for layer in layers:
        name = names.get(id(layer))
        if name and name.split(".")[-1] not in skip and name not in skip:
            result[name] = sorted(int(i) for i in ids)
    return result or None


def scale_token_rows_lr(optimizer, model, scale: float) -> int:
    """Move the trained token rows (peft's ``trainable_tokens_delta`` parameters) of each
    parameter group of ``optimizer`` into a group of their own at ``scale`` x its learning rate
    (before the scheduler is built, which reads each group's ``lr``). Returns how many
    parameters moved.

    Why: Adam moves each element by about the learning rate per step; a stop row that starts at
    the mean row must move by O(1) to make the token likely where the data ends a response.
    Measured (stories260K, the bundled ``stories260k-dolly-lora`` recipe without
    ``lora_modules_to_save``, 30 steps at 3e-3, P(``</s>``) at response ends over 26 Dolly
    responses): rows frozen 0.0037, rows trained at x1 0.0054, at x10 0.144; the whole
    ``lm_head`` in ``modules_to_save``: 0.026 (``python bench/token_rows_eos.py``).
    """
    if scale == 1:
        return 0
    names = {id(p): n for n, p in model.named_parameters()}
    moved = 0
    for group in list(optimizer.param_groups):
        rows = [p for p in group["params"] if "trainable_tokens_delta" in names.get(id(p), "")]
        if not rows:
            continue
        group["params"] = [p for p in group["params"] if all(p is not r for r in rows)]
        extra = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**extra, "params": rows, "lr": group["lr"] * scale})
        moved += len(rows)
    return moved
