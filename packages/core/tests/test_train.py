"""End-to-end runs through the real Trainer: demo, resume, NaN stop, loss normalisation."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import hookimpl
from plugtune.cli import main
from plugtune.config import load_recipe, validate_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.train import COMPLETE_MARKER, TrainingError, last_complete_checkpoint, train


def _small_demo(tmp_path, *extra):
    return load_recipe("demo", [f"output_dir={tmp_path / 'run'}", "datasets.0.max_samples=64",
                                "test_datasets.0.max_samples=8", "eval_before_training=false",
                                "logging_steps=1", *extra])


def test_demo_learns_and_cli_generates(tmp_path, capsys):
    """The embedded default: exact match on held-out words rises from ~0 (README's first command)."""
    out = tmp_path / "demo"
    assert main(["train", "demo", "--set", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["exact_match"] <= 0.05
    assert metrics["after"]["exact_match"] >= 0.8
    for f in ("model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json", "training.png",
              "README.md", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert "demo://tiny-llama" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "reverse bacd ="]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "dcab"


def _counting_pm(monkeypatch, name="count_plugin"):
    """A plugin manager whose train step counts its calls (then passes to the default)."""
    mod = types.ModuleType(name)
    calls = {"n": 0}

    @hookimpl(tryfirst=True)
    def plugtune_train_step(model):
        if model.training:
            calls["n"] += 1
        return None

    mod.plugtune_train_step = plugtune_train_step
    monkeypatch.setitem(sys.modules, name, mod)
    return get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": name}), calls


def test_resume_skips_incomplete_checkpoint(tmp_path, monkeypatch):
    r = _small_demo(tmp_path, "max_steps=2", "save_steps=2", "test_datasets=[]")
    train(r)
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / COMPLETE_MARKER).exists()
    # a run killed while writing checkpoint-3 leaves a folder without the marker
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")
    assert last_complete_checkpoint(run).name == "checkpoint-2"
    pm, calls = _counting_pm(monkeypatch)
    res = train(_small_demo(tmp_path, "max_steps=4", "save_steps=2", "test_datasets=[]"), pm=pm,
                resume=True)
    assert res.metrics["global_step"] == 4
    assert calls["n"] == 2, "the resumed run trains steps 3-4 only"
    assert (run / "checkpoint-4" / COMPLETE_MARKER).exists()


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(TrainingError, match="no run to resume"):
        train(_small_demo(tmp_path, "max_steps=1"), resume=True)


def test_nan_loss_stops_with_step(tmp_path, monkeypatch):
    mod = types.ModuleType("nan_plugin")
    calls = {"n": 0}

    @hookimpl(tryfirst=True)
    def plugtune_train_step(model, batch, num_items_in_batch):
        calls["n"] += 1
        out = model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        return out * float("nan") if calls["n"] >= 3 else out

    mod.plugtune_train_step = plugtune_train_step
    monkeypatch.setitem(sys.modules, "nan_plugin", mod)
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "nan_plugin"})
    with pytest.raises(TrainingError, match="at step 3"):
        train(_small_demo(tmp_path, "max_steps=5", "test_datasets=[]"), pm=pm)


def test_cli_reports_bad_recipe_without_traceback(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("base_model: x\nlearning_rat: 1\ndatasets: [{path: a.jsonl, type: alpaca}]\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "learning_rate" in err and "Traceback" not in err


def _weights_after_one_step(tmp_path, name, micro, accum):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "reverse ab =", "completion": " ba"},
            {"prompt": "reverse abcdefgh =", "completion": " hgfedcba hgfedcba"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = validate_recipe({
        "base_model": "demo://tiny-llama", "model_type": "causal_lm", "adapter": "none",
        "chat_template": "plain", "datasets": [{"path": str(data), "type": "prompt_completion"}],
        "sequence_len": 64, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
        "optimizer": "sgd", "learning_rate": 0.5, "lr_scheduler": "constant", "max_grad_norm": 0,
        "max_steps": 1, "group_by_length": False, "output_dir": str(tmp_path / name)})
    train(r)
    return load_file(tmp_path / name / "model.safetensors")


def test_gradient_accumulation_normalises_per_token_over_the_whole_step(tmp_path):
    """micro 1 x accum 2 must equal micro 2 x accum 1 (loss per label token, not per micro-batch)."""
    a = _weights_after_one_step(tmp_path, "a", 2, 1)
    b = _weights_after_one_step(tmp_path, "b", 1, 2)
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) < 1e-5
    moved = max(float((a[k] - load_file(Path(_demo_dir()) / "model.safetensors")[k]).abs().max()) for k in a)
    assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"


def _demo_dir():
    from plugtune.demo import materialize

    return materialize("demo://tiny-llama")


@pytest.mark.slow
def test_stories260k_dolly_lora_real_run(tmp_path, capsys):
    """The bundled real-input recipe: loss falls, generate loads base + adapter and prints text."""
    from plugtune.testing import shared_path

    model = shared_path("models", "stories260K", "hf")
    dolly = shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")
    out = tmp_path / "s260"
    rc = main(["train", "stories260k-dolly-lora", "--set", f"base_model={model}",
               "--set", f"datasets.0.path={dolly}", "--set", f"output_dir={out}",
               "--set", "model_type=causal_lm", "--set", "max_steps=12", "--set", "sequence_len=256",
               "--set", "val_set_size=0", "--set", "logging_steps=1"])
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    hist = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Tell me a story about a cat.", "--max-new-tokens", "24"]) == 0
    text = capsys.readouterr().out.strip()
    assert len(text) > 10
    assert torch.isfinite(torch.tensor(losses)).all()


def test_eval_max_samples_cuts_before_tokenizing(tmp_path, capsys):
    """``plugtune eval --max-samples N`` reads only the first N records: a bad record after
    them is never formatted (without the flag the same file stops with its line number)."""
    result = train(_small_demo(tmp_path, "max_steps=2", "test_datasets.0.max_samples=4"))
    data = tmp_path / "test.jsonl"
    good = [{"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"} for w in ("abc", "bcd", "cde")]
    data.write_text("\n".join(json.dumps(r) for r in [*good, {"prompt": "reverse x ="}]) + "\n")
    capsys.readouterr()
    assert main(["eval", str(result.output_dir), "--data", str(data), "--max-samples", "3"]) == 0
    assert '"eval_loss"' in capsys.readouterr().out
    assert main(["eval", str(result.output_dir), "--data", str(data)]) != 0
    err = capsys.readouterr()
    assert "test.jsonl:4" in err.out + err.err and "completion" in err.out + err.err


def test_eval_metrics_loss_skips_generation(tmp_path, capsys):
    """``plugtune eval --metrics loss`` scores the loss (token-weighted, with the token count)
    and generates nothing; an unknown metric name is refused before anything loads."""
    result = train(_small_demo(tmp_path, "max_steps=2", "test_datasets.0.max_samples=4"))
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"})
                              for w in ("abc", "bcd", "cde")) + "\n")
    capsys.readouterr()
    assert main(["eval", str(result.output_dir), "--data", str(data), "--metrics", "loss"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_tokens"] > 0 and math.isfinite(res["eval_loss"])
    assert "exact_match" not in res and "samples" not in res
    assert main(["eval", str(result.output_dir), "--data", str(data), "--metrics", "loss,bleu"]) == 2
    assert "bleu" in capsys.readouterr().out
