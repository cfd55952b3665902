"""End to end on real SAMSum: the bundled FLAN-T5 recipes through ``plugtune.train.train`` with a
tiny model, then ``plugtune eval RUN_DIR --data test.json`` for loss + ROUGE."""

from __future__ import annotations

import json
import math

import pytest

from plugtune.cli import main as cli_main
from plugtune.config import load_recipe
from plugtune.evaluate import rouge
from plugtune.testing import shared_path
from plugtune.train import train

pytestmark = pytest.mark.slow


def _run(name, tiny_dir, out, *extra):
    val = shared_path("samsum", "val.json")
    test = shared_path("samsum", "test.json")
    recipe = load_recipe(name, [
        f"base_model={tiny_dir}", f"output_dir={out}",
        f"datasets.0.path={val}", "datasets.0.max_samples=40",
        f"test_datasets.0.path={test}", "test_datasets.0.max_samples=4",
        "sequence_len=96", "micro_batch_size=4", "max_steps=10", "logging_steps=1",
        "warmup_steps=0", "lr_scheduler=constant", "eval_before_training=false",
        "eval_max_samples=2", "generation.max_new_tokens=8", "save_total_limit=1", *extra])
    return recipe, train(recipe)


def _falls(result):
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    print("losses", [round(x, 3) for x in losses])
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, f"loss did not fall: {losses}"
    return losses


def _eval_cli(run_dir, capsys, n=3, base=False):
    capsys.readouterr()
    rc = cli_main(["eval", str(run_dir), "--data", str(shared_path("samsum", "test.json")),
                   "--max-samples", str(n)])
    assert rc == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    if base:  # an adapter run is also scored without its adapter: the base-vs-tuned table
        assert {"rouge1", "rougeL", "eval_loss"} <= set(res["base"]) and "base vs fine-tuned" in out.err
    assert math.isfinite(res["eval_loss"]) and res["n"] == n
    samples = res["samples"]
    assert len(samples) == n
    refs = json.loads(shared_path("samsum", "test.json").read_text())[:n]
    assert [s["reference"] for s in samples] == [r["summary"] for r in refs]
    again = rouge([s["prediction"] for s in samples], [s["reference"] for s in samples])
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0.0 <= res[k] <= 1.0 and res[k] == pytest.approx(again[k], abs=1e-4)
    return res


def test_full_finetune_falls_and_evaluates(tiny_dir, tmp_path, capsys):
    recipe, result = _run("flan-t5-samsum-full", tiny_dir, tmp_path / "full", "learning_rate=3e-3",
                          "eval_before_training=true")
    assert recipe.adapter == "none"
    _falls(result)
    m = result.metrics
    assert m["trainable_params"] == m["total_params"]
    assert math.isfinite(m["eval_loss"])
    for when in ("before", "after"):  # base vs fine-tuned ROUGE, the table `plugtune train` prints
        assert m[when]["n"] == 2 and {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(m[when])
    assert (tmp_path / "full" / "model.safetensors").is_file()
    _eval_cli(tmp_path / "full", capsys)


def test_lora_8bit_falls_and_evaluates(tiny_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    recipe, result = _run("flan-t5-samsum-lora", tiny_dir, tmp_path / "lora", "learning_rate=1e-2")
    assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout) == (16, 32, 0.05)
    assert recipe.quantization == "8bit"
    _falls(result)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q", "v"] and cfg["task_type"] == "SEQ_2_SEQ_LM"
    assert 0 < result.metrics["trainable_params"] < result.metrics["total_params"] / 10
    # a summarization run is scored with ROUGE even when its recipe does not list it
    saved = tmp_path / "lora" / "recipe.yaml"
    saved.write_text(saved.read_text().replace("- rouge\n", ""))
    assert "rouge" not in saved.read_text()
    _eval_cli(tmp_path / "lora", capsys, base=True)


def test_qlora_4bit_all_linear_trains(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    recipe = load_recipe("flan-t5-samsum-lora", [
        f"base_model={tiny_dir}", f"output_dir={tmp_path / 'qlora'}", "adapter=qlora",
        "load_in_8bit=false", "lora_target_modules=all-linear",
        f"datasets.0.path={shared_path('samsum', 'val.json')}", "datasets.0.max_samples=8",
        "test_datasets=[]", "eval_before_training=false", "eval_metrics=[loss]",
        "sequence_len=64", "micro_batch_size=4", "max_steps=2", "logging_steps=1"])
    result = train(recipe)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    cfg = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(["q", "k", "v", "o", "wi_0", "wi_1", "wo"])


def test_recipes_validate():
    full = load_recipe("flan-t5-samsum-full")
    lora = load_recipe("flan-t5-samsum-lora")
    ds = load_recipe("flan-t5-xxl-samsum-deepspeed")
    for r in (full, lora, ds):
        assert r.datasets[0].type == "seq2seq"
        assert r.datasets[0].columns == {"source": "dialogue", "target": "summary"}
        assert r.generation.max_new_tokens > 20 and r.dtype != "fp16"
        assert "rouge" in r.eval_metrics
    assert lora.lora_target_modules == "auto" and lora.load_in_8bit
    assert ds.dtype == "bf16" and ds.deepspeed == "zero3" and ds.adapter == "none"
    scale = pytest.importorskip("plugtune.scale")
    if hasattr(scale, "deepspeed_config"):
        cfg = scale.deepspeed_config(ds.deepspeed)
        assert cfg["zero_optimization"]["stage"] == 3
