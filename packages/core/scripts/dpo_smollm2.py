"""Real evidence for ``rl: dpo``: SmolLM2-135M-Instruct (the GGUF in ../shared/data/models) trained
with DPO (LoRA) on LLaMA-Factory's ``dpo_en_demo.json``; held-out pairs scored before and after.

    python packages/core/scripts/dpo_smollm2.py --steps 30 --out /tmp/smollm2-dpo

Not a test (minutes on a CPU). The GGUF is de-quantized by transformers and written once as a
plain safetensors folder (``save_pretrained`` refuses a GGUF-loaded model, ../shared/FINDINGS.md).
Held-out metrics on the last ``--held-out`` pairs of the file (never trained on):

* ``implicit_reward_accuracy``: share of pairs whose DPO implicit reward
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` is higher for the chosen answer (0 before training
  by construction: the policy is the reference) and the mean implicit margin;
* ``logp_accuracy``: share of pairs where the policy gives the chosen answer a higher summed
  log-probability than the rejected one (meaningful before training too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

DATA = Path("../shared/data")
GGUF = DATA / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def plain_folder(dest: Path) -> Path:
    """The GGUF as a plain transformers folder (fp32 safetensors + tokenizer), written once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (dest / "model.safetensors").exists():
        return dest
    kw = {"gguf_file": GGUF.name}
    gg = AutoModelForCausalLM.from_pretrained(GGUF.parent, **kw)
    cfg = AutoConfig.from_pretrained(GGUF.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(gg.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(GGUF.parent, **kw).save_pretrained(dest)
    return dest


def pair_logps(model, rows, disable_adapter: bool) -> torch.Tensor:
    """Summed answer log-probabilities, shape ``(pairs, 2)`` (chosen, rejected)."""
    out = []
    ctx = model.disable_adapter if disable_adapter else contextlib.nullcontext
    model.eval()
    with torch.no_grad(), ctx():
        for r in rows:
            vals = []
            for ans in (r["chosen_ids"], r["rejected_ids"]):
                ids = torch.tensor([r["prompt_ids"] + ans])
                logits = model(input_ids=ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                vals.append(float(lp[len(r["prompt_ids"]) - 1:].sum()))
            out.append(vals)
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--out", default="/tmp/smollm2-dpo")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--seq", type=int, default=384)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = plain_folder(out / "base")
    pairs = json.loads((DATA / "llama_factory" / "dpo_en_demo.json").read_text())
    (out / "train.json").write_text(json.dumps(pairs[: -a.held_out]))
    (out / "held_out.json").write_text(json.dumps(pairs[-a.held_out:]))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugtune.config import validate_recipe
    from plugtune.data import prepare
    from plugtune.data.preference import tokenize_preferences
    from plugtune.data.templates import ensure_chat_template
    from plugtune.data.tokenize import probe_template
    from plugtune.train import train

    recipe = validate_recipe(dict(
        base_model=str(base), rl="dpo", adapter="lora", lora_r=16, lora_alpha=32,
        lora_dropout=0.0, lora_target_modules="all-linear",
        datasets=[dict(path=str(out / "train.json"), type="preference")],
        sequence_len=a.seq, micro_batch_size=2, gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr, lr_scheduler="constant", max_steps=a.steps, logging_steps=1,
        dpo_beta=a.beta, output_dir=str(out / "run"), save_total_limit=1))
    tok = AutoTokenizer.from_pretrained(base)  # the same tokenization as training
    ensure_chat_template(tok, recipe.chat_template)
    held_recipe = recipe.model_copy(update={"datasets": [recipe.datasets[0].model_copy(
        update={"path": str(out / "held_out.json")})]})
    held, _ = tokenize_preferences(prepare(held_recipe, tok, "causal").raw_train, tok,
                                   probe_template(tok), recipe.sequence_len)
    t0 = time.time()
    res = train(recipe)
    train_s = time.time() - t0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out / "run"))
    ref = pair_logps(model, held, disable_adapter=True)
    pol = pair_logps(model, held, disable_adapter=False)
    implicit = a.beta * (pol - ref)
    margin = implicit[:, 0] - implicit[:, 1]
    report = {
        "pairs_held_out": len(held), "steps": a.steps, "pairs_per_step": 2 * a.grad_accum,
        "lr": a.lr, "beta": a.beta, "sequence_len": a.seq, "train_seconds": round(train_s, 1),
        "before": {"implicit_reward_accuracy": 0.0, "implicit_margin": 0.0,
                   "logp_accuracy": round(float((ref[:, 0] > ref[:, 1]).float().mean()), 4)},
        "after": {"implicit_reward_accuracy": round(float((margin > 0).float().mean()), 4),
                  "implicit_margin": round(float(margin.mean()), 4),
                  "logp_accuracy": round(float((pol[:, 0] > pol[:, 1]).float().mean()), 4)},
        "train_rewards_accuracies": [res.metrics.get("first_rewards_accuracies"),
                                     res.metrics.get("last_rewards_accuracies")],
    }
    print(json.dumps(report, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
