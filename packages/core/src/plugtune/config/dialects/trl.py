"""TRL CLI configs (``trl sft --config FILE``) and alignment-handbook recipes -> plugtune recipe.

Keys as TRL defines them: ``ScriptArguments`` (``dataset_name``, ``dataset_config``,
``dataset_train_split``, ``dataset_test_split``), ``ModelConfig`` (``model_name_or_path``,
``torch_dtype``, ``use_peft``, ``lora_*``, ``load_in_4bit``), ``SFTConfig`` / ``DPOConfig``
(``max_length``, ``max_seq_length``, ``packing``, ``beta``, ``loss_type``, ...) plus
``TrainingArguments`` (:mod:`plugtune.config.dialects._hf`); the alignment-handbook adds
``dataset_mixture`` / ``dataset_mixer`` + ``dataset_splits``. Detected by ``model_name_or_path``
without LLaMA-Factory's ``stage`` / ``finetuning_type``.

The file does not say which trainer it is for (``trl sft`` or ``trl dpo`` does): DPO keys
(``beta``, ``max_prompt_length``) make it DPO, else SFT. A dataset that is a local file keeps its
columns' format: ``messages`` -> chat, ``chosen``/``rejected`` -> preference, ``text`` -> text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plugtune.config.dialects import _hf
from plugtune.config.dialects.base import Translation, is_unset

NAME = "TRL"

RENAMED = {
    "model_name_or_path": "base_model", "model_revision": "revision",
    "trust_remote_code": "trust_remote_code", "attn_implementation": "attn_implementation",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules", "lora_modules_to_save": "lora_modules_to_save",
    "use_dora": "peft_use_dora", "use_rslora": "peft_use_rslora", "load_in_4bit": "load_in_4bit",
    "load_in_8bit": "load_in_8bit", "chat_template": "chat_template", "beta": "dpo_beta",
    "loss_type": "dpo_loss_type", "packing": "sample_packing", "max_length": "sequence_len",
    "max_seq_length": "sequence_len", "label_smoothing": "dpo_label_smoothing",
}
HANDLED = {"use_peft", "dataset_name", "dataset_config", "dataset_train_split",
           "dataset_test_split", "dataset_mixture", "dataset_mixer", "dataset_splits",
           "completion_only_loss", "assistant_only_loss", "dataset_text_field", "lora_task_type"}
NOTED = {
    "max_prompt_length": "prompts are truncated first when a pair exceeds sequence_len",
    "max_completion_length": "pairs are bounded by sequence_len", "bnb_4bit_quant_type":
    "plugtune's 4-bit base is NF4", "use_bnb_nested_quant": "plugtune's 4-bit base always uses "
    "double quantization", "precompute_ref_log_probs": "the reference runs with the adapter off",
    "gradient_checkpointing_use_reentrant": "plugtune checkpoints with use_reentrant: false",
    "dataset_streaming": None, "eos_token": "the tokenizer's eos token is used",
    "pad_token": "the tokenizer's pad token is used", "model_init_kwargs": None,
    "ignore_bias_buffers": "no bias buffers are trained", "padding_free": "plugtune packs "
    "with reset position ids (packing: true)",
}
NOTED = {k: v for k, v in NOTED.items() if v}
_DPO_KEYS = {"beta", "max_prompt_length", "max_completion_length", "loss_type",
             "precompute_ref_log_probs", "rpo_alpha", "ref_model_init_kwargs"}


def detect(data: dict[str, Any]) -> bool:
    """TRL / alignment-handbook: ``model_name_or_path`` (and not LLaMA-Factory)."""
    return "model_name_or_path" in data


#: hub datasets of TRL's examples whose rows are plain text
_TEXT_DATASETS = {"stanfordnlp/imdb", "imdb", "trl-lib/tldr"}


def _local_type(path: str, dpo: bool) -> str:
    """The plugtune dataset type of a local file from its first record's columns."""
    if dpo:
        return "preference"
    if path in _TEXT_DATASETS:
        return "text"
    p = Path(path)
    first: dict = {}
    try:
        if p.suffix == ".jsonl":
            with p.open(encoding="utf-8") as fh:
                first = json.loads(fh.readline() or "{}")
        elif p.suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            first = rows[0] if isinstance(rows, list) and rows else {}
    except (OSError, ValueError):
        first = {}
    if "chosen" in first and "rejected" in first:
        return "preference"
    if "text" in first and "messages" not in first:
        return "text"
    return "messages"


def _dataset(path: str, name: str | None, split: str, dpo: bool, text_field: str | None) -> dict:
    entry: dict[str, Any] = {"path": path, "split": split,
                             "type": "text" if text_field else _local_type(path, dpo)}
    if name and name != "default" and not Path(path).exists():
        entry["name"] = name
    if text_field and text_field != "text":
        entry["columns"] = {"text": text_field}
    return entry


def translate(data: dict[str, Any], source: str = "<recipe>") -> Translation:
    """Translate a TRL CLI config or alignment-handbook recipe.

    Raises:
        plugtune.config.RecipeError: a key plugtune cannot honour, or one TRL does not have.
    """
    from plugtune.config.schema import RecipeError, did_you_mean

    d = {k: v for k, v in data.items() if not is_unset(v)}
    out: dict[str, Any] = {}
    notices: list[str] = []
    errors: list[str] = []
    dpo = any(k in d for k in _DPO_KEYS)
    if dpo:
        out["rl"] = "dpo"
    # TRL's ModelConfig: no PEFT unless use_peft (a full fine-tune); its LoRA defaults
    out["adapter"] = "lora" if d.get("use_peft") else "none"
    if d.get("use_peft"):
        out.update(lora_r=16, lora_alpha=32, lora_dropout=0.05)
    out.update(group_by_length=False, sequence_len=1024, micro_batch_size=8, learning_rate=5e-5 if not dpo else 1e-6,
               lr_scheduler="linear", max_grad_norm=1.0, num_epochs=3, logging_steps=10)
    if d.get("use_peft") and d.get("load_in_4bit"):
        out["adapter"] = "qlora"
    if "completion_only_loss" in d:
        out["train_on_inputs"] = not d["completion_only_loss"]
    if "assistant_only_loss" in d:
        out["train_on_inputs"] = not d["assistant_only_loss"]
    for k, v in d.items():
        if k in RENAMED:
            out[RENAMED[k]] = v
        elif k in NOTED:
            notices.append(f"{k}: ignored ({NOTED[k]})")
        elif k in HANDLED or _hf.known(k):
            continue
        elif k in _hf.TRAINING_ARGUMENTS:
            errors.append(f"  {k}: a TrainingArguments key plugtune does not expose")
        else:
            errors.append(f"  {k}: unknown TRL key"
                          f"{did_you_mean(k, [*RENAMED, *HANDLED, *NOTED, *_hf.TRAINING_ARGUMENTS])}")
    if out.get("adapter") == "qlora":
        out.pop("load_in_4bit", None)
    resume = _hf.translate_training(d, out, notices, errors)
    text_field = d.get("dataset_text_field")
    datasets: list[dict] = []
    tests: list[dict] = []
    if "dataset_name" in d:
        datasets.append(_dataset(str(d["dataset_name"]), d.get("dataset_config"),
                                 str(d.get("dataset_train_split", "train")), dpo, text_field))
        if d.get("do_eval") or d.get("eval_strategy", "no") != "no":
            test_split = str(d.get("dataset_test_split", "test"))
            tests.append(_dataset(str(d["dataset_name"]), d.get("dataset_config"), test_split,
                                  dpo, text_field))
    mixture = d.get("dataset_mixture")
    if isinstance(mixture, dict):
        for ds in mixture.get("datasets", []):
            split = str(ds.get("split", "train"))
            target = tests if "test" in split else datasets
            target.append(_dataset(str(ds["id"]), ds.get("config"), split, dpo, text_field))
            if ds.get("weight", 1.0) != 1.0:
                notices.append(f"dataset_mixture: {ds['id']}: weight {ds['weight']} ignored "
                               "(plugtune concatenates datasets)")
        if mixture.get("test_split_size") and not tests:
            out["val_set_size"] = mixture["test_split_size"]
    mixer = d.get("dataset_mixer")
    if isinstance(mixer, dict):
        for ds_id, frac in mixer.items():
            for split in d.get("dataset_splits", ["train"]):
                target = tests if "test" in str(split) else datasets
                target.append(_dataset(str(ds_id), None, str(split), dpo, text_field))
            if frac != 1.0:
                notices.append(f"dataset_mixer: {ds_id}: fraction {frac} ignored")
    if datasets:
        out["datasets"] = datasets
    if tests:
        out["test_datasets"] = tests
    if errors:
        raise RecipeError(f"TRL config {source}: keys plugtune cannot honour:\n" + "\n".join(errors))
    return Translation(data=out, dialect=NAME, notices=notices, resume=resume)
