"""What a run tells you: tokens/s and memory at each logging step, the run summary and
metrics.json (never null), training.png, report_to (TensorBoard; a missing package named before
any model loads), quiet library notices, the data-loss warning, recipes list/show/copy,
--version."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plugtune import bundled, observe
from plugtune.cli import main
from plugtune.config import list_bundled_recipes, load_recipe

DEMO_SETS = ["datasets.0.max_samples=64", "test_datasets.0.max_samples=8",
             "eval_before_training=false", "eval_metrics=[loss]", "logging_steps=1"]
#: stderr lines a user did not cause: library warnings, deprecations, notices
UNASKED = re.compile(r"warn|deprecat|\[transformers\]|bitsandbytes|kernels|PAD/BOS/EOS|"
                     r"Token indices", re.IGNORECASE)


def _nulls(value, path="") -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    return []


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_cpu_lora_run_console_metrics_plot_and_no_unasked_warnings(tmp_path):
    """``plugtune train`` as a user runs it (a subprocess: every stream it writes): each logging
    line has loss, learning rate, grad norm, tokens/s and peak memory; the summary names time,
    tokens, tokens/s, memory, losses and the folder; metrics.json has them with no null under
    max_steps; training.png is 1200x800; stderr holds no warning the user did not cause."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "plugtune", "train", "demo", "--set", "adapter=lora",
           "--set", "lora_target_modules=all-linear", "--set", "max_steps=4",
           "--set", f"output_dir={out}"]
    for kv in DEMO_SETS:
        cmd += ["--set", kv]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    step_lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{'loss'")]
    assert len(step_lines) == 4, res.stdout
    for ln in step_lines:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mib"):
            assert f"'{key}'" in ln, (key, ln)
    summary = res.stdout[res.stdout.index("plugtune: done in"):]
    for pattern in (r"done in [\d.]+ s \(training [\d.]+ s, 4 steps\)",
                    r"tokens seen [\d,]+, [\d,]+ tokens/s, peak memory [\d,]+ MiB",
                    r"train loss [\d.]+ .*eval loss [\d.]+", re.escape(f"run folder: {out}")):
        assert re.search(pattern, summary), (pattern, summary)

    m = json.loads((out / "metrics.json").read_text())
    assert _nulls(m) == []
    for key in ("wall_seconds", "train_seconds", "tokens_seen", "real_tokens_per_second",
                "peak_memory_mib", "train_loss", "last_logged_loss", "eval_loss"):
        assert isinstance(m[key], int | float) and m[key] > 0, (key, m.get(key))
    assert m["wall_seconds"] >= m["train_seconds"]
    hist = json.loads((out / "log_history.json").read_text())
    logged = [h for h in hist if "loss" in h]
    assert [h["tokens_seen"] for h in logged] == sorted(h["tokens_seen"] for h in logged)
    assert logged[-1]["tokens_seen"] == m["tokens_seen"]
    assert _png_size(out / "training.png") == (1200, 800)

    unasked = [ln for ln in res.stderr.splitlines() if UNASKED.search(ln)]
    assert unasked == [], "\n".join(unasked)


@pytest.mark.parametrize(("inputs", "pad", "expected"), [
    ({"input_ids": torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]]),
      "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}, 0, 4),
    # packed rows: no mask, the pad tail (pad == eos inside the row still counts)
    ({"input_ids": torch.tensor([[5, 0, 6, 7, 0, 0]]),
      "position_ids": torch.tensor([[0, 1, 0, 1, 0, 1]])}, 0, 4),
    # DPO: prompt + chosen + rejected, each with its mask
    ({"prompt_input_ids": torch.tensor([[1, 2, 0]]), "prompt_attention_mask": torch.tensor([[1, 1, 0]]),
      "chosen_input_ids": torch.tensor([[3, 4]]), "chosen_attention_mask": torch.tensor([[1, 1]]),
      "rejected_input_ids": torch.tensor([[5, 0]]), "rejected_attention_mask": torch.tensor([[1, 0]])},
     0, 5),
    # GRPO: prompt_ids/prompt_mask + completion_ids/completion_mask
    ({"prompt_ids": torch.tensor([[1, 2]]), "prompt_mask": torch.tensor([[0, 1]]),
      "completion_ids": torch.tensor([[3, 4, 9]]), "completion_mask": torch.tensor([[1, 1, 0]])},
     9, 3),
    # no pad id known and no mask: every position
    ({"input_ids": torch.tensor([[1, 2, 3]])}, None, 3),
    # KTO: the KL rows have their own mask; token types / positions are no tokens
    ({"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
      "KL_input_ids": torch.tensor([[3, 0, 0]]), "KL_attention_mask": torch.tensor([[1, 0, 0]]),
      "mm_token_type_ids": torch.tensor([[1, 1, 1]])}, 0, 3),
    # float tensors, labels and 1-d ids are not token ids of a row
    ({"labels": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3)}, 0, 0),
])
def test_real_tokens_of_every_method_batch(inputs, pad, expected):
    assert observe.real_tokens(inputs, pad) == expected


@pytest.mark.parametrize("rl", ["dpo", "kto", "orpo", "reward", "grpo"])
def test_every_method_logs_tokens_and_memory_and_writes_no_null(tmp_path, rl):
    """fit_and_save gives every method the observer: each logged step has tokens/s and peak
    memory, metrics.json the run numbers and no null (a watched key never logged is left out)."""
    from plugtune.train import train

    torch.set_num_threads(1)
    if rl == "grpo":
        from test_grpo import _rl_recipe

        rec = _rl_recipe("demo://tiny-llama", tmp_path / "run", rl, adapter="lora", max_steps=2,
                         logging_steps=1, eval_max_samples=2, reward_funcs=["exact_match"])
    else:
        from test_alignment import _recipe

        rec = _recipe(tmp_path, rl, {}, max_steps=2)
    res = train(rec)
    logged = [h for h in res.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["tokens_per_second"] > 0 and h["peak_memory_mib"] > 0
                                    for h in logged), logged
    m = json.loads((res.output_dir / "metrics.json").read_text())
    assert _nulls(m) == []
    assert m["tokens_seen"] == logged[-1]["tokens_seen"] > 0
    assert m["real_tokens_per_second"] > 0 and m["wall_seconds"] >= m["train_seconds"]


def test_report_to_tensorboard_writes_an_event_file(tmp_path):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("tensorboard is not installed (pip install 'plugtune[tensorboard]'; the nox "
                    "core session installs it)")
    from plugtune.train import train

    out = tmp_path / "run"
    train(load_recipe("demo", [f"output_dir={out}", "max_steps=2", "report_to=tensorboard",
                               *DEMO_SETS]))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    assert max(e.stat().st_size for e in events) > 100


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_missing_report_package_is_named_before_any_model_loads(tmp_path, monkeypatch, capsys,
                                                                backend):
    import plugtune.train
    from plugtune.trainer_options import REPORT_MODULES

    monkeypatch.setitem(REPORT_MODULES, backend, ("plugtune_no_such_module",))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(plugtune.train, "prepare_run", no_model)
    rc = main(["train", "demo", "--set", f"output_dir={tmp_path / 'run'}",
               "--set", f"report_to={backend}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"pip install 'plugtune[{backend}]'" in err and f"report_to: {backend}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("logger", "message", "why"), observe.QUIET_LOGS)
def test_quiet_hides_listed_notices_and_verbose_shows_them(logger, message, why):
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log, handler = logging.getLogger(logger), Keep()
    log.addHandler(handler)
    try:
        observe.quiet(verbose=False)
        log.warning(message + " (details)")
        log.warning("an unrelated warning")
        assert seen == ["an unrelated warning"], why
        observe.quiet(verbose=True)
        log.warning(message + " (details)")
        assert seen[-1].startswith(message)
    finally:
        log.removeHandler(handler)
        observe.quiet(verbose=False)


@pytest.mark.parametrize("message", [
    "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
    "`gradient_checkpointing_kwargs` is deprecated and will be removed in v1.2.",
])
def test_quiet_hides_library_deprecations_and_verbose_shows_them(message):
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            observe.quiet(verbose=False)
            warnings.warn(message, FutureWarning, stacklevel=1)
            warnings.warn("a FutureWarning of the user's own code", FutureWarning, stacklevel=1)
            assert [str(w.message) for w in caught] == ["a FutureWarning of the user's own code"]
            observe.quiet(verbose=True)
            warnings.warn(message, FutureWarning, stacklevel=1)
            assert str(caught[-1].message) == message
    finally:
        observe.quiet(verbose=False)


def test_bitsandbytes_notices_hidden_only_when_nothing_is_quantized():
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    try:
        observe.quiet(verbose=False, quantized=False)
        assert not bnb.isEnabledFor(logging.WARNING)
        observe.quiet(verbose=False, quantized=True)
        assert bnb.isEnabledFor(logging.WARNING)
    finally:
        observe.quiet(verbose=False)


@pytest.mark.parametrize(("stats", "expected"), [
    ({"samples": 100, "dropped": 5, "truncated": 5, "truncated_tokens": 40}, None),
    ({"samples": 100, "dropped": 10, "truncated": 0}, "10 of 100 samples (10 %) dropped as too long"),
    ({"samples": 135, "dropped": 0, "truncated": 35, "truncated_tokens": 32810},
     "35 of 135 (26 %) truncated (32,810 tokens cut)"),
    ({"samples": 0, "dropped": 0, "truncated": 0}, None),
    # preference pairs: truncation counted, no token count
    ({"samples": 20, "dropped": 0, "truncated": 4}, "4 of 20 (20 %) truncated at sequence_len"),
])
def test_data_loss_warning_above_the_share(stats, expected):
    from plugtune.data.pipeline import data_loss_warning

    line = data_loss_warning(stats, load_recipe("demo"))
    if expected is None:
        assert line is None
    else:
        assert expected in line and "sequence_len=32" in line and "\n" not in line


def test_recipes_lists_full_names_piped_and_as_json(capsys):
    names = list(list_bundled_recipes())
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == names
    assert main(["recipes"]) == 0  # captured: not a terminal
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == names
    assert main(["recipes", "show", "demo"]) == 0
    assert capsys.readouterr().out == list_bundled_recipes()["demo"].read_text()
    assert main(["recipes", "show", "dem"]) == 2
    assert "Did you mean 'demo'" in capsys.readouterr().err


def test_recipe_copy_explains_files_not_on_this_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundled, "repo_root", lambda: None)
    assert main(["recipes", "copy", "stories260k-dolly-lora", "mine"]) == 0
    text = (tmp_path / "mine" / "stories260k-dolly-lora.yaml").read_text()
    assert "base_model: ../shared/data/models/stories260K/hf  # not on this machine: karpathy" in text
    assert "databricks-dolly" in text and "lora_r: 16" in text
    assert "not on this machine" in capsys.readouterr().out
    assert main(["recipes", "copy", "stories260k-dolly-lora", "mine"]) == 2  # never overwrites


def test_bundled_recipe_with_missing_data_says_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundled, "repo_root", lambda: None)
    assert main(["train", "stories260k-dolly-lora"]) == 2
    err = capsys.readouterr().err
    assert "datasets.0.path: ../shared/data/dolly/" in err and "databricks-dolly" in err
    assert "base_model: ../shared/data/models/stories260K/hf" in err and "--set" in err


def test_copied_recipe_runs_from_another_directory(tmp_path, monkeypatch, capsys):
    """``plugtune recipes copy`` then ``plugtune train COPY`` from a folder that is not the
    repository: the copy's ../shared paths were made absolute."""
    root = bundled.repo_root()
    if root is None or not (root.parent / "shared" / "data" / "dolly").is_dir():
        pytest.skip("../shared/data beside the repository is absent")
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "stories260k-dolly-lora"]) == 0
    copy = tmp_path / "stories260k-dolly-lora.yaml"
    import yaml

    data = yaml.safe_load(copy.read_text())
    assert bundled.local_paths(data) == [] and Path(data["base_model"]).is_dir()
    assert copy.read_text().startswith("# copied from plugtune's bundled recipe")
    capsys.readouterr()
    assert main(["train", str(copy), "--set", "model_type=causal_lm", "--set", "max_steps=2",
                 "--set", "sequence_len=128", "--set", "val_set_size=0",
                 "--set", "output_dir=run"]) == 0
    assert "run folder: run" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 2


def test_version_names_plugtune_and_each_plugin(capsys):
    from importlib.metadata import entry_points

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plugtune ")
    for ep in entry_points(group="plugtune"):
        assert any(f"plugin {ep.name}:" in ln for ln in lines), (ep.name, lines)
