"""Run reports: the loss-curve PNG and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from plugtune.config import Recipe
from plugtune.spec import ModelSpec


def loss_curve_png(log_history: list[dict], path: Path) -> None:
    """Plot training (and eval) loss against optimizer step into ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 40 else None)
    if ev:
        ax.plot(*zip(*ev), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(recipe: Recipe, spec: ModelSpec, metrics: dict, stats: dict) -> str:
    """A short model card (README.md) saying what was trained on what, and how it went."""
    ds = "\n".join(f"- `{d.path}` (type `{d.type}`)" for d in recipe.datasets)
    if recipe.adapter == "none":
        what, load = "full weights", f"AutoModelForCausalLM.from_pretrained('{recipe.output_dir}')"
    else:
        what = f"a LoRA adapter (r={recipe.lora_r}, alpha={recipe.lora_alpha})"
        load = f"PeftModel.from_pretrained(base, '{recipe.output_dir}')"
        if stats.get("added_tokens"):  # the base needs the run's vocabulary size first
            load = (f"base.resize_token_embeddings(len(AutoTokenizer.from_pretrained("
                    f"'{recipe.output_dir}'))); {load}")
    keep = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    return f"""---
base_model: {recipe.base_model}
library_name: {"peft" if recipe.adapter != "none" else "transformers"}
tags: [plugtune, {spec.family.name}, {recipe.adapter}]
---
# {Path(recipe.output_dir).name}

Fine-tuned with [plugtune](https://github.com/plugtune/plugtune): {what} on top of
`{recipe.base_model}` (model_type `{spec.model_type}`, family `{spec.family.name}`, plugin
`{spec.plugin}`){", base quantized " + spec.quantization if spec.quantization else ""}.

## Data
{ds}

sequence_len {recipe.sequence_len}, sample_packing {recipe.sample_packing}, train_on_inputs
{recipe.train_on_inputs}; {stats.get("samples")} samples, {stats.get("rows")} rows,
{stats.get("real_tokens")} real tokens, {stats.get("truncated")} truncated, {stats.get("dropped")} dropped.

## Training
micro_batch_size {recipe.micro_batch_size} x gradient_accumulation_steps
{recipe.gradient_accumulation_steps}, learning_rate {recipe.learning_rate}, epochs
{recipe.num_epochs}, max_steps {recipe.max_steps}.

## Metrics
```json
{json.dumps(keep, indent=2, default=str)}
```
{"Before / after: `" + json.dumps(metrics.get("before")) + "` -> `" + json.dumps(metrics.get("after")) + "`" if metrics.get("before") else ""}

## Use
`plugtune generate {recipe.output_dir} --prompt "..."`, or in Python `{load}`.
Loss curve: `loss.png`. Full recipe: `recipe.yaml`.
"""
