"""Runs you can trust: output-folder policy, run identity, interruption and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from safetensors.torch import load_file

from plugtune import hookimpl
from plugtune.cli import main
from plugtune.config import load_recipe
from plugtune.plugins import get_plugin_manager
from plugtune.runstate import (
    COMPLETE_MARKER,
    RUN_FILE,
    RunStateError,
    completed_message,
    prepare_output_dir,
    run_identity,
    run_record,
    write_run_file,
)
from plugtune.train import TrainingError, TrainingInterrupted, train

TESTS = Path(__file__).parent


def _demo(tmp_path, *extra, name="run"):
    return load_recipe("demo", [f"output_dir={tmp_path / name}", "datasets.0.max_samples=48",
                                "test_datasets=[]", "eval_before_training=false", "logging_steps=1",
                                *extra])


def _fake_checkpoint(run: Path, step: int, recipe, complete: bool = True) -> Path:
    d = run / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if recipe is not None:
        write_run_file(d, run_record(recipe))
    if complete:
        (d / COMPLETE_MARKER).write_text("{}")
    return d


# --- folder policy and identity (no model) ------------------------------------------------


def test_identity_ignores_bookkeeping_not_math(tmp_path):
    a = _demo(tmp_path)
    assert run_identity(a) == run_identity(_demo(tmp_path, "logging_steps=7", "save_steps=3",
                                                 "max_steps=99", name="elsewhere"))
    assert run_identity(a) != run_identity(_demo(tmp_path, "learning_rate=1e-3"))
    assert run_identity(a) != run_identity(_demo(tmp_path, "datasets.0.max_samples=47"))


def test_folder_with_another_run_is_refused_unless_resume_or_overwrite(tmp_path):
    old = _demo(tmp_path, "learning_rate=1e-3")
    run = tmp_path / "run"
    _fake_checkpoint(run, 30, old)
    (run / "model.safetensors").write_bytes(b"old weights")
    (run / "notes.txt").write_text("mine")
    new = _demo(tmp_path)
    with pytest.raises(RunStateError, match="holds another run.*--resume.*--overwrite"):
        prepare_output_dir(new)
    # --resume never takes the other run's checkpoint, and says which keys differ
    with pytest.raises(RunStateError, match="another run.*learning_rate"):
        prepare_output_dir(new, resume=True)
    said = []
    assert prepare_output_dir(new, overwrite=True, say=said.append) is None
    assert not (run / "checkpoint-30").exists() and not (run / "model.safetensors").exists()
    assert any("checkpoint-30" in s for s in said) and any("model.safetensors" in s for s in said)
    assert (run / "notes.txt").read_text() == "mine", "files plugtune did not write stay"
    assert json.loads((run / RUN_FILE).read_text())["identity"] == run_identity(new)


def test_resume_takes_newest_complete_checkpoint_of_this_run_only(tmp_path):
    mine, other = _demo(tmp_path), _demo(tmp_path, "seed=7")
    run = tmp_path / "run"
    _fake_checkpoint(run, 4, mine)
    _fake_checkpoint(run, 6, mine, complete=False)  # killed while saving
    _fake_checkpoint(run, 8, other)                  # another run's, newer
    _fake_checkpoint(run, 9, None)                   # no identity at all
    said = []
    assert prepare_output_dir(mine, resume=True, say=said.append).name == "checkpoint-4"
    assert not (run / "checkpoint-6").exists() and any("checkpoint-6" in s for s in said)
    with pytest.raises(RunStateError, match="--resume and --overwrite"):
        prepare_output_dir(mine, resume=True, overwrite=True)


def test_cli_resume_with_nothing_to_resume_fails_before_loading_torch(tmp_path):
    code = ("import sys; from plugtune.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    for argv in (["train", "--resume", str(tmp_path / "nothing")],
                 ["train", "demo", "--resume", "--set", f"output_dir={tmp_path / 'empty'}"]):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        assert "no run to resume" in " ".join(p.stderr.split()) and "Traceback" not in p.stderr


# --- real runs (tiny demo model) ---------------------------------------------------------


def test_resume_run_dir_takes_the_saved_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "demo", "--set", f"output_dir={run}", "--set", "datasets.0.max_samples=48",
                 "--set", "test_datasets=[]", "--set", "eval_before_training=false",
                 "--set", "learning_rate=1e-3", "--set", "max_steps=2", "--set", "save_steps=2"]) == 0
    # the same command again is refused: the folder holds that run
    assert main(["train", "demo", "--set", f"output_dir={run}", "--set", "max_steps=2"]) == 2
    assert "holds another run" in " ".join(capsys.readouterr().err.split())
    assert main(["train", "--resume", str(run), "--set", "max_steps=3"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 3
    saved = json.loads((run / RUN_FILE).read_text())["recipe"]
    assert saved["learning_rate"] == 1e-3 and saved["datasets"][0]["max_samples"] == 48


def _signal_pm(monkeypatch, at_step: int, times: int = 1):
    """A plugin manager whose train step sends SIGINT to this process ``times`` times at
    ``at_step`` (then passes to the default train step)."""
    mod = types.ModuleType("sigint_plugin")
    seen = {"n": 0}

    @hookimpl(tryfirst=True)
    def plugtune_train_step(model):
        if model.training:
            seen["n"] += 1
            if seen["n"] == at_step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return None

    mod.plugtune_train_step = plugtune_train_step
    monkeypatch.setitem(sys.modules, "sigint_plugin", mod)
    return get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "sigint_plugin"})


def test_sigint_saves_a_checkpoint_at_this_step_and_names_the_resume_command(tmp_path, monkeypatch):
    pm = _signal_pm(monkeypatch, at_step=3)
    r = _demo(tmp_path, "max_steps=6")  # no save before step 6
    with pytest.raises(TrainingInterrupted) as ei:
        train(r, pm=pm)
    run = tmp_path / "run"
    assert (run / "checkpoint-3" / COMPLETE_MARKER).exists()
    assert f"plugtune train --resume {run}" in str(ei.value)
    assert not (run / "model.safetensors").exists(), "an interrupted run is not a finished run"
    res = train(r, resume=True)
    assert res.metrics["global_step"] == 6


def test_second_sigint_aborts_at_once_and_claims_no_checkpoint(tmp_path, monkeypatch, capsys):
    pm = _signal_pm(monkeypatch, at_step=2, times=2)
    monkeypatch.setattr("plugtune.train.get_plugin_manager", lambda *a, **k: pm)
    run = tmp_path / "run"
    rc = main(["train", "demo", "--set", f"output_dir={run}", "--set", "datasets.0.max_samples=48",
               "--set", "test_datasets=[]", "--set", "eval_before_training=false",
               "--set", "max_steps=6"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 130
    assert not list(run.glob("checkpoint-*"))
    assert "no checkpoint of this run was saved" in err and "intact" not in err


def test_loss_exactly_zero_for_several_steps_stops_naming_the_step(tmp_path, monkeypatch):
    mod = types.ModuleType("zero_plugin")

    @hookimpl(tryfirst=True)
    def plugtune_train_step(model, batch, num_items_in_batch):
        out = model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        return out * 0.0 if model.training else out

    mod.plugtune_train_step = plugtune_train_step
    monkeypatch.setitem(sys.modules, "zero_plugin", mod)
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "zero_plugin"})
    with pytest.raises(TrainingError, match="exactly 0 for 3 .* step 3"):
        train(_demo(tmp_path, "max_steps=8"), pm=pm)


def _killed(tmp_path, kind: str, n: int, *argv: str) -> int:
    p = subprocess.run([sys.executable, str(TESTS / "killable_run.py"), kind, str(n), "--", *argv],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return p.returncode


def test_sigkill_at_several_points_then_resume_equals_the_straight_run(tmp_path):
    """Default recipe settings (group_by_length, LoRA dropout, cosine warm-up), 2 epochs of 6
    steps, checkpoint every 3 steps; killed mid-step (step 5), inside the save of checkpoint-9
    and in epoch 2 (step 11): every logged loss, learning rate and the final weights equal the
    uninterrupted run's bit for bit, and train_loss covers the whole run."""
    sets = ["datasets.0.max_samples=48", "test_datasets=[]", "eval_before_training=false",
            "sample_packing=false", "adapter=lora", "micro_batch_size=8", "num_epochs=2",
            "warmup_steps=2", "save_steps=3", "logging_steps=2", "eval_metrics=[loss]"]
    straight = train(load_recipe("demo", [*sets, f"output_dir={tmp_path / 'straight'}"]))
    assert straight.metrics["global_step"] == 12
    run = tmp_path / "killed"
    argv = ["train", "demo", *[x for s in sets for x in ("--set", s)], "--set", f"output_dir={run}"]
    assert _killed(tmp_path, "step", 5, *argv) == -signal.SIGKILL
    assert _killed(tmp_path, "save", 9, "train", "--resume", str(run)) == -signal.SIGKILL
    assert not (run / "checkpoint-9" / COMPLETE_MARKER).exists()
    assert _killed(tmp_path, "step", 11, "train", "--resume", str(run)) == -signal.SIGKILL
    assert main(["train", "--resume", str(run)]) == 0

    def logged(folder):
        hist = json.loads((folder / "log_history.json").read_text())
        return [(h["step"], h["loss"], h["learning_rate"]) for h in hist if "loss" in h]

    assert logged(run) == logged(tmp_path / "straight")
    a = load_file(run / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    ma = json.loads((run / "metrics.json").read_text())
    steps = logged(tmp_path / "straight")
    whole = sum(loss * (s - p) for (s, loss, _), p in zip(steps, [0] + [s for s, _, _ in steps])) / 12
    assert ma["train_loss"] == pytest.approx(whole, rel=1e-12)
    assert ma["train_loss"] == straight.metrics["train_loss"]
    assert f'"train_loss": {json.dumps(ma["train_loss"])}' in (run / "README.md").read_text()


def test_eval_remaps_columns_and_compares_with_the_base(tmp_path, capsys):
    """``plugtune eval RUN --data F --columns prompt=q,completion=a``: a file with other column
    names evaluates; an adapter run is scored with and without its adapter (stderr table)."""
    run = tmp_path / "run"
    assert main(["train", "demo", "--set", f"output_dir={run}", "--set", "datasets.0.max_samples=48",
                 "--set", "test_datasets=[]", "--set", "eval_before_training=false",
                 "--set", "adapter=lora", "--set", "learning_rate=0.01", "--set", "max_steps=4"]) == 0
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps({"q": f"reverse {w} =", "a": f" {w[::-1]}"}) + "\n"
                            for w in ("abc", "bcd", "cde")))
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--columns", "prompt=q,completion=a"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["n"] == 3 and res["base"]["n"] == 3
    assert res["eval_loss"] != res["base"]["eval_loss"]
    assert "base vs fine-tuned" in out.err
    assert main(["eval", str(run), "--data", str(data)]) == 2  # prompt/completion columns absent


def test_completed_message_reads_steps_or_epochs_from_trainer_state(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 2.0}))
    assert "step 4 of 4" in completed_message(ckpt, _demo(tmp_path, "max_steps=4"))
    assert completed_message(ckpt, _demo(tmp_path, "max_steps=5")) is None
    assert "epoch 2 of 2" in completed_message(ckpt, _demo(tmp_path, "num_epochs=2"))
    assert completed_message(ckpt, _demo(tmp_path, "num_epochs=3")) is None
    assert completed_message(tmp_path, _demo(tmp_path, "max_steps=4")) is None  # no state


def test_resume_of_a_finished_run_trains_nothing_and_extension_trains_exactly_the_new_steps(
        tmp_path):
    run = tmp_path / "run"
    sets = [f"output_dir={run}", "datasets.0.max_samples=48", "test_datasets=[]",
            "eval_before_training=false", "logging_steps=1", "save_steps=100"]
    assert main(["train", "demo", *[x for s in sets for x in ("--set", s)],
                 "--set", "max_steps=2"]) == 0
    assert main(["train", "--resume", str(run), "--set", "max_steps=4"]) == 0  # steps 3-4 only
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    # resumed again (the saved recipe says max_steps 4): nothing to train, no torch, no write
    code = ("import sys; from plugtune.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "train", "--resume", str(run)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "run already complete (step 4 of 4)" in " ".join(p.stdout.split())
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not (run / "checkpoint-5").exists()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4
    # the library entry point refuses the same way, before loading a model
    with pytest.raises(TrainingError, match="run already complete"):
        train(load_recipe("demo", [*sets, "max_steps=4"]), resume=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
