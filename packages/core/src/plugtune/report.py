"""Run reports: the training plot (``training.png``) and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from plugtune.config import Recipe
from plugtune.spec import ModelSpec


def _series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in log_history
            if isinstance(h.get(key), int | float) and "step" in h]


def training_png(log_history: list[dict], path: Path, title: str = "") -> None:
    """Plot a run's ``log_history`` into ``path``: a 1200x800 PNG (matplotlib, Agg) of 2x2
    panels against the optimizer step: train and eval loss; learning rate; grad norm; real
    tokens/s and peak memory (MiB, right axis) from :class:`plugtune.trainer.RunObserver`.
    The loss panel has the epoch on a secondary top axis (epoch = step x epochs/steps, from
    the logged ``epoch``). A panel with nothing logged says so. ``title``: the figure title
    (run name, model, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    (ax_loss, ax_lr), (ax_gn, ax_tps) = axes

    def line(ax, pts, label, **kw):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 40 else None, **kw)
        return bool(pts)

    shown = [line(ax_loss, _series(log_history, "loss"), "train loss"),
             line(ax_loss, _series(log_history, "eval_loss"), "eval loss", color="C1")]
    ax_loss.set_ylabel("loss (nats / label token)")
    if any(shown):
        ax_loss.legend()
    epochs = _series(log_history, "epoch")
    steps_per_epoch = [s / e for s, e in epochs if s and e]
    if steps_per_epoch:
        k = steps_per_epoch[-1]
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s / k, lambda e: e * k))
        top.set_xlabel("epoch")
    panels = ((ax_loss, "loss", any(shown)),
              (ax_lr, "learning rate", line(ax_lr, _series(log_history, "learning_rate"),
                                            "learning rate", color="C2")),
              (ax_gn, "grad norm (before clipping)",
               line(ax_gn, _series(log_history, "grad_norm"), "grad norm", color="C3")),
              (ax_tps, "real tokens / s",
               line(ax_tps, _series(log_history, "tokens_per_second"), "tokens/s", color="C4")))
    mem = _series(log_history, "peak_memory_mib")
    if mem:
        ax_mem = ax_tps.twinx()
        ax_mem.plot(*zip(*mem), color="C5", linestyle="--", label="peak memory")
        ax_mem.set_ylabel("peak memory (MiB, dashed)")
    for ax, name, has in panels:
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if not has:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_title(recipe: Recipe, spec: ModelSpec | None = None) -> str:
    """``<run folder name> - <base model> - <method> (<adapter>)``: the title of ``training.png``."""
    method = recipe.method or "sft"
    model = recipe.base_model.rstrip("/").split("/")[-1] if recipe.base_model else "?"
    if model in ("hf", "model") and "/" in recipe.base_model:  # .../stories260K/hf
        model = "/".join(recipe.base_model.rstrip("/").split("/")[-2:])
    fam = f", {spec.family.name}" if spec is not None else ""
    return f"{Path(recipe.output_dir).name} - {model}{fam} - {method} ({recipe.adapter})"


PIPELINE_TAGS = {"causal": "text-generation", "seq2seq": "text2text-generation",
                 "vision": "image-text-to-text"}


def _front_matter(folder: Path) -> dict:
    """The YAML front matter of ``folder/README.md`` (a local base's model card), or ``{}``."""
    import yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(recipe: Recipe, spec: ModelSpec) -> dict:
    """Hub model-card metadata: ``base_model`` (a hub id; for a local base the ``base_model`` its
    own card names, else omitted: the Hub rejects paths), ``library_name``, ``pipeline_tag``,
    ``tags``, ``datasets`` (hub ids only) and ``license`` (from a local base's card or GGUF)."""
    from plugtune.export.portable import is_local

    base = recipe.base_model
    meta: dict = {}
    local = base.startswith("demo://") or is_local(base)
    if not local:
        meta["base_model"] = base
    else:
        fm = _front_matter(Path(spec.path))
        if isinstance(fm.get("base_model"), str) and not is_local(fm["base_model"]):
            meta["base_model"] = fm["base_model"]
        if fm.get("license"):
            meta["license"] = fm["license"]
    meta["library_name"] = "peft" if recipe.adapter != "none" else "transformers"
    meta["pipeline_tag"] = PIPELINE_TAGS.get(spec.task, "text-generation")
    method = "dpo" if recipe.rl == "dpo" else "sft"
    meta["tags"] = list(dict.fromkeys(["plugtune", spec.family.name, recipe.adapter, method]))
    hub = [d.path for d in recipe.datasets if not d.path.startswith("demo://") and not is_local(d.path)]
    if hub:
        meta["datasets"] = hub
    return meta


def _example_messages(recipe: Recipe) -> list[dict]:
    first = recipe.datasets[0] if recipe.datasets else None
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    if first is not None and first.system_prompt:
        msgs.insert(0, {"role": "system", "content": first.system_prompt})
    return msgs


def usage_snippet(recipe: Recipe, spec: ModelSpec, run_dir: str, base: str,
                  added_tokens: bool) -> str:
    """Python that loads the run with plain transformers (+ peft) and answers one chat turn."""
    msgs = _example_messages(recipe)
    auto = "AutoModelForSeq2SeqLM" if spec.task == "seq2seq" else "AutoModelForCausalLM"
    lines = ["from transformers import " + auto + ", AutoTokenizer, GenerationConfig"]
    if recipe.adapter != "none":
        lines[0:0] = ["from peft import PeftModel"]
        lines += ["", f"run = {run_dir!r}  # this folder (or its Hub id once pushed)",
                  "tokenizer = AutoTokenizer.from_pretrained(run)",
                  f"model = {auto}.from_pretrained({base!r})"]
        if added_tokens:
            lines += ["model.resize_token_embeddings(len(tokenizer))  # tokens added in training"]
        lines += ["model = PeftModel.from_pretrained(model, run)"]
    else:
        lines += ["", f"run = {run_dir!r}  # this folder (or its Hub id once pushed)",
                  "tokenizer = AutoTokenizer.from_pretrained(run)",
                  f"model = {auto}.from_pretrained(run)"]
    if spec.task == "seq2seq":
        lines += ['inputs = tokenizer(' + repr(msgs[-1]["content"]) + ', return_tensors="pt")']
    else:
        lines += [f"messages = {msgs!r}",
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
                  '                                       return_tensors="pt", return_dict=True)']
    lines += ["out = model.generate(**inputs, max_new_tokens=32,",
              "                     generation_config=GenerationConfig.from_pretrained(run))",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
              if spec.task != "seq2seq" else
              "print(tokenizer.decode(out[0], skip_special_tokens=True))"]
    return "\n".join(lines)


def prompt_format(tokenizer, recipe: Recipe) -> str:
    """One example turn rendered with the run's chat template (what the model was trained on)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return ""
    from plugtune.data.templates import template_name

    msgs = [*_example_messages(recipe), {"role": "assistant", "content": "Paris."}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs other inputs: show nothing
        return ""
    name = template_name(tokenizer.chat_template)
    how = f"the named `{name}` template" if name else "the tokenizer's chat template"
    return (f"## Prompt format\n\nRendered with {how} (saved with the tokenizer: "
            "`apply_chat_template` gives the trained token ids):\n\n```text\n" + text + "\n```\n")


def model_card(recipe: Recipe, spec: ModelSpec, metrics: dict, stats: dict, tokenizer=None,
               run_dir: str | None = None, base: str | None = None,
               added_tokens: bool = False) -> str:
    """The run's model card (README.md): Hub metadata (:func:`card_metadata`), what was trained
    on what, the prompt format, recipe and results, and a usage snippet that runs as written.

    Args:
        run_dir: absolute path of the run folder (default: ``recipe.output_dir`` resolved).
        base: the base as ``adapter_config.json`` names it (default: ``recipe.base_model``).
        added_tokens: tokens were added to the vocabulary (the snippet resizes embeddings).
    """
    import yaml

    run_dir = run_dir or str(Path(recipe.output_dir).resolve())
    base = base or recipe.base_model
    added_tokens = added_tokens or bool(stats.get("added_tokens"))
    ds = "\n".join(f"- `{d.path}` (type `{d.type}`)" for d in recipe.datasets)
    if recipe.adapter == "none":
        what = "full weights"
    else:
        what = f"a LoRA adapter (r={recipe.lora_r}, alpha={recipe.lora_alpha})"
    keep = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    meta = yaml.safe_dump(card_metadata(recipe, spec), sort_keys=False).strip()
    snippet = usage_snippet(recipe, spec, run_dir, base, added_tokens)
    return f"""---
{meta}
---
# {Path(recipe.output_dir).name}

Fine-tuned with [plugtune](https://github.com/plugtune/plugtune): {what} on top of
`{recipe.base_model}` (model_type `{spec.model_type}`, family `{spec.family.name}`, plugin
`{spec.plugin}`){", base quantized " + spec.quantization if spec.quantization else ""}.

{prompt_format(tokenizer, recipe)}
## Data
{ds}

sequence_len {recipe.sequence_len}, sample_packing {recipe.sample_packing}, train_on_inputs
{recipe.train_on_inputs}; {stats.get("samples")} samples, {stats.get("rows")} rows,
{stats.get("real_tokens")} real tokens, {stats.get("truncated")} truncated, {stats.get("dropped")} dropped.

## Training
micro_batch_size {recipe.micro_batch_size} x gradient_accumulation_steps
{recipe.gradient_accumulation_steps}, learning_rate {recipe.learning_rate}, epochs
{recipe.num_epochs}, max_steps {recipe.max_steps}. Full recipe: `recipe.yaml`; loss, learning rate, grad norm
and tokens/s: `training.png`.

## Results
```json
{json.dumps(keep, indent=2, default=str)}
```
{"Before / after: `" + json.dumps(metrics.get("before")) + "` -> `" + json.dumps(metrics.get("after")) + "`" if metrics.get("before") else ""}

## Use

```python
{snippet}
```

With plugtune: `plugtune chat {run_dir}` or `plugtune generate {run_dir} --prompt "..."`;
`plugtune export {run_dir} --format gguf --ollama` for llama.cpp / Ollama.
"""
