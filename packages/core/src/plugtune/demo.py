"""The embedded default: a tiny model and a synthetic task made by the package itself.

``demo://`` paths in a recipe are materialized into ``$PLUGTUNE_HOME/demo`` (default
``~/.cache/plugtune/demo``) on first use, so ``plugtune train demo`` needs nothing from outside:

* ``demo://tiny-llama``: a Llama-architecture model (hidden 128, 2 layers, ~0.4M parameters)
  with random weights from a fixed seed, and a character-level tokenizer (``tokenizers``
  WordLevel, 48 tokens) that has BOS/EOS/PAD;
* ``demo://reverse-train.jsonl`` / ``demo://reverse-test.jsonl``: prompt/completion pairs
  asking to reverse a word of 3-6 letters from ``a``-``h`` (2000 train, 100 held-out, disjoint).

Exact match of the reversed word starts at 0 with random weights and rises with training.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

SCHEME = "demo://"
_ALPHABET = "abcdefgh"
_VOCAB_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 :=.,?!-\n")
_VERSION = "2"


def demo_home() -> Path:
    base = os.environ.get("PLUGTUNE_HOME") or os.path.join(Path.home(), ".cache", "plugtune")
    return Path(base) / "demo" / f"v{_VERSION}"


def _write_tokenizer(dest: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + _VOCAB_CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(dest)


def _write_model(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # fork_rng: making the model must not move the caller's RNG, or a run that materializes the
    # demo initialises its LoRA weights differently from every later run (or from other ranks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4 + len(_VOCAB_CHARS), hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)


def _write_data(dest: Path) -> None:
    rng = random.Random(1234)
    words: set[str] = set()
    while len(words) < 2100:
        n = rng.randint(3, 6)
        words.add("".join(rng.choice(_ALPHABET) for _ in range(n)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    for name, chunk in (("reverse-train.jsonl", ordered[:2000]), ("reverse-test.jsonl", ordered[2000:])):
        # temp file + rename: ranks of a multi-process launch may write it at the same time
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for w in chunk:
                fh.write(json.dumps({"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"}) + "\n")
        os.replace(tmp, dest / name)


def _ensure(name: str) -> Path:
    home = demo_home()
    if name == "tiny-llama":
        dest = home / "tiny-llama"
        if not (dest / "model.safetensors").exists():
            import shutil

            # a private temp folder, renamed into place: the ranks of a multi-process launch all
            # get here at once on a fresh PLUGTUNE_HOME; the first rename wins, the rest drop theirs
            home.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=home, prefix=".tiny-llama."))
            _write_tokenizer(tmp)
            _write_model(tmp)
            if dest.exists() and not (dest / "model.safetensors").exists():
                shutil.rmtree(dest, ignore_errors=True)  # a leftover from an older layout
            try:
                os.replace(tmp, dest)
            except OSError:
                if not (dest / "model.safetensors").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        return dest
    if name in ("reverse-train.jsonl", "reverse-test.jsonl"):
        if not (home / "reverse-test.jsonl").exists():
            home.mkdir(parents=True, exist_ok=True)
            _write_data(home)
        return home / name
    raise ValueError(f"unknown demo resource {SCHEME}{name}; known: tiny-llama, "
                     "reverse-train.jsonl, reverse-test.jsonl")


def materialize(path: str) -> str:
    """Return ``path`` unchanged, or the local path of a ``demo://`` resource (created once)."""
    if not path.startswith(SCHEME):
        return path
    return str(_ensure(path[len(SCHEME):]))
