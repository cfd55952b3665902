"""Does a LoRA run on stories260K (whose ``</s>`` row is untrained) learn to stop?

    python bench/token_rows_eos.py            # from the repository root, ../shared beside it

Trains the bundled ``stories260k-dolly-lora`` recipe four ways (30 optimizer steps) and prints
the geometric-mean P(``</s>``) the tuned model gives at the ends of 32 Dolly responses:
the whole ``lm_head`` in ``lora_modules_to_save`` (the recipe as shipped), token rows frozen
(``train_token_rows: false``), and the ``</s>`` rows trained (``plugtune.token_rows``) at 1x and
at the default ``token_rows_lr_scale`` 10x. Writes ``bench/results/token_rows_eos.json``.
"""

from __future__ import annotations

import json
import math
import pathlib
import tempfile

import torch

from plugtune.config import load_recipe
from plugtune.data.loading import to_canonical
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.runs import load_run
from plugtune.train import train

SHARED = pathlib.Path("../shared/data")
VARIANTS = {
    "lm_head_in_modules_to_save": [],
    "rows_frozen": ["lora_modules_to_save=null", "train_token_rows=false"],
    "rows_trained_x1": ["lora_modules_to_save=null", "token_rows_lr_scale=1"],
    "rows_trained_x10": ["lora_modules_to_save=null"],
}


def p_eos_at_response_ends(run: pathlib.Path, recipe, n: int = 32) -> tuple[float, int]:
    _, loaded, _ = load_run(run)
    tok = loaded.tokenizer
    info = probe_template(tok)
    ds, _ = to_canonical(recipe.datasets[0])
    logps = []
    for ex in ds.select(range(n)):
        row = tokenize_chat(tok, ex["messages"], info, recipe.sequence_len)
        if not row["input_ids"]:
            continue
        with torch.no_grad():
            lp = loaded.model(torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)
        logps += [float(lp[t - 1, lab]) for t, lab in enumerate(row["labels"])
                  if lab == tok.eos_token_id and t > 0]
    return math.exp(sum(logps) / len(logps)), len(logps)


def main() -> None:
    out: dict[str, dict] = {}
    for name, sets in VARIANTS.items():
        run = pathlib.Path(tempfile.mkdtemp()) / "run"
        recipe = load_recipe("stories260k-dolly-lora", [
            f"base_model={SHARED / 'models/stories260K/hf'}", "model_type=causal_lm",
            f"datasets.0.path={SHARED / 'dolly/dolly_validation_151.instruction_context_response.jsonl'}",
            f"output_dir={run}", *sets])
        result = train(recipe)
        p, n = p_eos_at_response_ends(run, recipe)
        out[name] = {"p_eos_at_response_end": p, "responses": n,
                     "steps": result.metrics["global_step"], "train_loss": result.metrics["train_loss"]}
        print(name, out[name], flush=True)
    dest = pathlib.Path(__file__).parent / "results" / "token_rows_eos.json"
    dest.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
