"""Generation metrics: exact match and ROUGE (rouge-score, Lin 2004) on held-out examples."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and extra whitespace (SQuAD's normalisation, Rajpurkar 2016)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (0..1) of predictions equal to their reference after :func:`normalize_answer`."""
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (0..1) with stemming, via ``rouge-score``.

    ROUGE-Lsum splits sentences on newlines, as the ``evaluate`` library does.

    Raises:
        ImportError: rouge-score is not installed (``pip install 'plugtune[eval]'``).
    """
    try:
        from rouge_score import rouge_scorer, scoring
    except ImportError as exc:  # pragma: no cover
        raise ImportError("ROUGE needs rouge-score: pip install 'plugtune[eval]'") from exc
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    agg = scoring.BootstrapAggregator()
    for p, r in zip(predictions, references):
        agg.add_scores(scorer.score(r, p))
    res = agg.aggregate()
    return {t: round(res[t].mid.fmeasure, 4) for t in types}


def evaluate_generation(pm, spec, model, tokenizer, examples: list[dict], metrics: Sequence[str],
                        max_new_tokens: int, images=None, processor=None) -> dict:
    """Generate for each example's prompt with ``plugtune_generate`` and score the outputs.

    Args:
        examples: ``{"prompt": [messages], "reference": str}`` dicts (from the data pipeline);
            vision examples also carry ``images`` (paths), passed per prompt when ``images``
            is not given.
        metrics: any of ``exact_match``, ``rouge``.
        processor: ``Loaded.processor`` (vision families), handed to ``plugtune_generate``.

    Returns:
        ``{"n": int, "exact_match": float, "rouge1": float, ..., "samples": [first 3]}``.
    """
    examples = [e for e in examples if "reference" in e]
    prompts = [e["prompt"] for e in examples]
    refs = [e["reference"] for e in examples]
    if images is None and any(e.get("images") for e in examples):
        images = [e.get("images") or None for e in examples]
    preds = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tokenizer, prompts=prompts,
                                      max_new_tokens=max_new_tokens, images=images,
                                      processor=processor)
    out: dict = {"n": len(refs)}
    if "exact_match" in metrics:
        out["exact_match"] = round(exact_match(preds, refs), 4)
    if "rouge" in metrics:
        out.update(rouge(preds, refs))
    out["samples"] = [{"reference": r, "prediction": p} for r, p in list(zip(refs, preds))[:3]]
    return out
