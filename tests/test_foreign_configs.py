"""Real axolotl, LLaMA-Factory and TRL / alignment-handbook configs, read in place from
../shared/data/configs (see its README for source, commit and license), run through
``plugtune train CONFIG`` unchanged but for the model and dataset paths, against tiny random
models built with the real tokenizers. CPU time: ``sequence_len`` 256, 2 steps, micro batch <= 2,
no gradient accumulation, and ``push_to_hub: false`` (no network): the only other overrides.

A case that needs a dataset type or ``rl`` method this checkout does not have is skipped, naming
what it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugtune.testing import load_shared_tokenizer, shared_path

FIX = ("configs", "axolotl", "fixtures")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny random models saved with the real tokenizers, built on first use."""
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        dest = root / name
        if name == "mistral":
            from plugtune_mistral.tiny import save_tiny as save_mistral

            save_mistral(dest, load_shared_tokenizer("mistral_v1"))
        elif name == "qwen2_vl":
            from plugtune_vision.tiny import TOKENIZER_OF
            from plugtune_vision.tiny import save_tiny as save_vision

            save_vision("qwen2_vl", dest, load_shared_tokenizer(TOKENIZER_OF["qwen2_vl"]))
        elif name == "falcon":
            from plugtune_falcon.tiny import save_tiny as save_falcon

            save_falcon("multi_query", dest, load_shared_tokenizer("falcon"))
        else:
            from plugtune_llama.tiny import save_tiny

            family, tok = {"llama2": ("llama", "llama2"), "llama3": ("llama", "llama3_2"),
                           "qwen2": ("qwen2", "qwen2_5")}[name]
            save_tiny(family, dest, load_shared_tokenizer(tok))
        made[name] = dest
        return dest

    return get


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alpaca_rows() -> list[dict]:
    rows = json.loads(shared_path("llama_factory", "alpaca_en_demo.json").read_text())
    return [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 400][:40]


# (config, model, dataset overrides as --set items with {fix}/{tmp}, needs: dataset types / rl)
CASES = [
    ("axolotl/llama-2__lora.yml", "llama2",
     ["datasets.0.path={fix}/mhenrichsen__alpaca_2k_test.parquet"], ()),
    ("axolotl/llama-2__qlora.yml", "llama2",
     ["datasets.0.path={fix}/mhenrichsen__alpaca_2k_test.parquet"], ()),
    ("axolotl/llama-3__lora-1b.yml", "llama3",
     ["datasets.0.path={fix}/teknium__GPT4-LLM-Cleaned.json"], ()),
    ("axolotl/llama-3__instruct-lora-8b.yml", "llama3",
     ["datasets.0.path={fix}/fozziethebeat__alpaca_messages_2k_test.parquet"], ("chat_template",)),
    ("axolotl/mistral__lora.yml", "mistral",
     ["datasets.0.path={fix}/mhenrichsen__alpaca_2k_test.parquet"], ()),
    ("axolotl/mistral__qlora.yml", "mistral",
     ["datasets.0.path={fix}/mhenrichsen__alpaca_2k_test.parquet"], ()),
    ("axolotl/archived__falcon__config-7b-lora.yml", "falcon",
     ["datasets.0.path={fix}/teknium__GPT4-LLM-Cleaned.json"], ("alpaca:chat",)),
    ("axolotl/mistral__dpo__mistral-dpo-qlora.yml", "mistral",
     ["datasets.0.path={fix}/olivermolenschot__alpaca_messages_dpo_test.parquet"],
     ("chat_template.default",)),
    ("axolotl/qwen2__dpo.yaml", "qwen2",
     ["datasets.0.path={fix}/fozziethebeat__alpaca_messages_2k_dpo_test.parquet"],
     ("chat_template.default",)),
    ("axolotl/llama-3__qlora-1b-kto.yaml", "llama3",
     ["datasets.0.path={fix}/argilla__ultrafeedback-binarized-preferences-cleaned-kto.parquet"],
     ("llama3.ultra", "rl:kto")),
    ("axolotl/mistral__orpo__mistral-qlora-orpo.yml", "mistral",
     ["datasets.0.path={fix}/argilla__ultrafeedback-binarized-preferences-cleaned.parquet"],
     ("chat_template.argilla", "rl:orpo")),
    ("axolotl/qwen2__reward-model.yaml", "qwen2",
     ["datasets.0.path={fix}/argilla__distilabel-intel-orca-dpo-pairs.parquet"],
     ("bradley_terry.chat_template", "rl:reward")),
    ("axolotl/qwen2-vl__lora-7b.yaml", "qwen2_vl",
     ["datasets.0.path={fix}/HuggingFaceH4__llava-instruct-mix-vsft.parquet"], ("chat_template",)),
    ("llama_factory/llama3_lora_sft.yaml", "llama3", ["dataset_dir={lf}"], ("registry",)),
    ("llama_factory/llama3_lora_dpo.yaml", "llama3", ["dataset_dir={lf}"], ("registry",)),
    ("trl/trl__example_config.yaml", "qwen2", ["dataset_name={tmp}/imdb.jsonl"], ()),
    ("trl/alignment-handbook__smollm2_sft_config.yaml", "llama2",
     ["dataset_name={tmp}/smoltalk"], ()),
]

_MODEL_KEY = {"axolotl": "base_model", "llama_factory": "model_name_or_path",
              "trl": "model_name_or_path"}
_SPEED = {
    "axolotl": ["max_steps=2", "sequence_len=256", "gradient_accumulation_steps=1"],
    "llama_factory": ["max_steps=2", "cutoff_len=256", "gradient_accumulation_steps=1",
                      "max_samples=16"],
    "trl": ["max_steps=2", "gradient_accumulation_steps=1", "per_device_train_batch_size=2",
            "per_device_eval_batch_size=2"],
}


def _missing(needs: tuple[str, ...]) -> list[str]:
    from plugtune.config import DATASET_TYPES, RecipeError, validate_recipe

    out = []
    for need in needs:
        if need == "registry":
            try:
                import plugtune.data.registry  # noqa: F401
            except ImportError:
                out.append("LLaMA-Factory dataset_info.json reading (plugtune.data.registry)")
        elif need.startswith("rl:"):
            method = need[3:]
            extra = {"reward_model": True} if method == "reward" else {"rl": method}
            try:
                validate_recipe({"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}],
                                 **extra})
            except RecipeError:
                out.append(f"the {method} training method")
        elif need not in DATASET_TYPES:
            out.append(f"dataset type {need}")
    return out


def _stand_ins(tmp: Path) -> None:
    """Local files with the columns of the hub datasets the TRL configs name."""
    rows = _alpaca_rows()
    _write_jsonl(tmp / "imdb.jsonl", [{"text": r["output"], "label": i % 2} for i, r in enumerate(rows)])
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}], "source": "alpaca_en_demo"}
             for r in rows]
    _write_jsonl(tmp / "smoltalk" / "train.jsonl", chats[:32])
    _write_jsonl(tmp / "smoltalk" / "test.jsonl", chats[32:])


@pytest.mark.parametrize("config,model,sets,needs", CASES, ids=[c[0] for c in CASES])
def test_real_config_trains_unchanged_but_for_paths(config, model, sets, needs, tiny_models,
                                                    tmp_path, monkeypatch, capsys):
    from plugtune.cli import main

    missing = _missing(needs)
    if missing:
        pytest.skip(f"{config} needs {', '.join(missing)}, not in this checkout")
    tool = config.split("/")[0]
    src = shared_path("configs", config)
    fix = shared_path(*FIX)
    _stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fmt = {"fix": fix, "tmp": tmp_path, "lf": shared_path("llama_factory")}
    argv = ["train", str(src), "--set", f"{_MODEL_KEY[tool]}={tiny_models(model)}",
            "--set", f"output_dir={tmp_path / 'run'}"]
    for kv in [*(s.format(**fmt) for s in sets), *_SPEED[tool]]:
        argv += ["--set", kv]
    import yaml

    raw = yaml.safe_load(src.read_text())
    for key in ("max_seq_length", "max_length"):  # TRL's sequence length, lowered for CPU time
        if key in raw:
            argv += ["--set", f"{key}=256"]
    if raw.get("push_to_hub"):  # no network here
        argv += ["--set", "push_to_hub=false"]
    if raw.get("report_to") not in (None, "none", ["none"]):  # no tracker installed here: a
        argv += ["--set", "report_to=none"]  # missing one is refused before the model loads
    if tool == "axolotl":
        mbs = raw.get("micro_batch_size") or 1
        if mbs > 2:
            argv += ["--set", "micro_batch_size=2"]
        if "qlora" in config:  # bitsandbytes' 4-bit eval forward of a hidden-32 model fails on
            argv += ["--set", "val_set_size=0"]  # CPU ("shape [32, 0] is invalid"): train only
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    dialect = {"axolotl": "an axolotl", "llama_factory": "a LLaMA-Factory", "trl": "a TRL"}[tool]
    assert f"detected {dialect} config" in " ".join(out.out.split())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2
