"""``plugtune chat RUN``: a multi-turn chat in the terminal, tokens streamed as they come
(``transformers.TextStreamer``), the conversation rendered with the run's chat template.

Each line read from ``stdin`` is a user turn (``/reset`` clears the history, ``/exit`` or end of
input stops); the answer is printed as it is generated and kept in the history.
"""

from __future__ import annotations

import sys
from typing import TextIO


def chat(run_dir: str, system: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
         max_new_tokens: int | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> list[dict]:
    """Chat with a run (see the module docstring); returns the conversation.

    Args:
        system: system prompt (default: the recipe's first dataset's ``system_prompt``).
        temperature: 0 = greedy; above 0 samples with ``top_p`` (nucleus sampling).
        max_new_tokens: per answer (default: the recipe's ``generation.max_new_tokens``).

    Raises:
        plugtune.runs.RunDirError: not a run folder, or its base is missing.
    """
    import torch
    from transformers import TextStreamer

    from plugtune.modeling import stop_token_ids
    from plugtune.runs import load_run

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    spec, loaded, _ = load_run(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    first = spec.recipe.datasets[0] if spec.recipe.datasets else None
    system = system if system is not None else (first.system_prompt if first else None)
    n = max_new_tokens or spec.recipe.generation.max_new_tokens
    stops = stop_token_ids(tok, model)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    class _Out(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    for line in stdin:
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, eos_token_id=stops or None,
                                 pad_token_id=tok.pad_token_id,
                                 streamer=_Out(tok, skip_prompt=True, skip_special_tokens=True), **kw)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})
    return history
