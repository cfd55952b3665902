"""Which run an output folder holds, and whether a new run may start or resume there.

Pure bookkeeping, no torch or transformers import (``plugtune train --resume`` with nothing to
resume fails in well under a second, before any model is loaded).

* **Run identity.** :func:`run_identity` hashes the resolved recipe minus :data:`NON_MATH_KEYS`
  (where the run is written, how often it logs/saves/evaluates, how long it runs). Two recipes
  with the same identity train the same weights at every step they both reach. ``max_steps`` and
  ``num_epochs`` are left out so a finished run can be *extended* with
  ``--resume --set max_steps=...``; the learning-rate schedule then follows the new length from
  the checkpoint on (an exact continuation only when the length is unchanged).
* **The run file.** ``plugtune_run.json`` (:data:`RUN_FILE`) sits in the run folder from the
  moment training starts, and in every checkpoint: ``{"identity", "identity_keys", "recipe"}``.
  ``plugtune train --resume RUN_DIR`` takes the recipe from it.
* **Folder policy** (:func:`prepare_output_dir`): a folder that holds another run (weights, an
  adapter or checkpoints) is refused unless ``resume`` (continue it) or ``overwrite`` (remove
  exactly the files a plugtune run writes, listing them; other files stay).
* **Checkpoint choice** (:func:`select_checkpoint`): the newest *complete* checkpoint (it carries
  :data:`COMPLETE_MARKER`, written after everything else) whose identity equals the run's;
  a checkpoint of another run, or one without identity, is never taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

RUN_FILE = "plugtune_run.json"
COMPLETE_MARKER = "plugtune_checkpoint_complete"

#: recipe keys that do not change the weights a step produces: output and bookkeeping,
#: evaluation-only settings, and the run length (see the module docstring)
NON_MATH_KEYS = frozenset({
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "eval_steps", "report_to",
    "eval_metrics", "eval_before_training", "eval_max_samples", "eval_batch_size", "generation",
    "test_datasets", "dataset_num_proc", "max_steps", "num_epochs",
})

#: files and folders a plugtune run writes into its output folder (what ``--overwrite`` removes)
RUN_FILES = (
    RUN_FILE, "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
    "model.safetensors.index.json", "config.json", "generation_config.json", "recipe.yaml",
    "metrics.json", "data_stats.json", "log_history.json", "training.png", "loss.png", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "spiece.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "training_args.bin", "runs",
)
_VALUABLE = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


class RunStateError(RuntimeError):
    """The output folder holds another run, or there is nothing (of this run) to resume."""


class RunAlreadyComplete(RunStateError):
    """``--resume`` of a run whose checkpoint already reached the run's end; the message says
    how far it got and how to extend it (``plugtune train`` prints it and exits 0)."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a run after it saved a checkpoint; the message names the checkpoint
    and the command that continues the run."""


# ---------------------------------------------------------------------------------------------
# identity


def identity_payload(recipe) -> dict[str, Any]:
    """The recipe keys that define the run's math (a ``Recipe`` or its ``model_dump`` dict)."""
    data = recipe if isinstance(recipe, dict) else recipe.model_dump(mode="json")
    return {k: v for k, v in sorted(data.items()) if k not in NON_MATH_KEYS}


def run_identity(recipe) -> str:
    """16 hex digits of sha256 over :func:`identity_payload` as canonical JSON."""
    blob = json.dumps(identity_payload(recipe), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_record(recipe) -> dict[str, Any]:
    """What :data:`RUN_FILE` holds: identity, the keys it covers and the whole recipe."""
    data = recipe.model_dump(mode="json")
    return {"identity": run_identity(data), "identity_keys": identity_payload(data), "recipe": data}


def write_run_file(folder: str | Path, record: dict[str, Any]) -> None:
    """Write :data:`RUN_FILE` into ``folder`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RUN_FILE}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
    os.replace(tmp, folder / RUN_FILE)


def read_run_file(folder: str | Path) -> dict[str, Any] | None:
    """The :data:`RUN_FILE` record of ``folder``, or ``None`` when absent/unreadable."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------
# checkpoints


def _step(d: Path) -> int | None:
    try:
        return int(d.name.rsplit("-", 1)[-1])
    except ValueError:
        return None


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """All ``checkpoint-N`` folders of ``output_dir``, ascending by ``N``."""
    out = [(s, d) for d in Path(output_dir).glob("checkpoint-*") if d.is_dir()
           and (s := _step(d)) is not None]
    return sorted(out)


def last_complete_checkpoint(output_dir: str | Path, identity: str | None = None) -> Path | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (of run ``identity`` when given)."""
    for _, d in reversed(checkpoints(output_dir)):
        if not (d / COMPLETE_MARKER).exists():
            continue
        if identity is not None and (read_run_file(d) or {}).get("identity") != identity:
            continue
        return d
    return None


def select_checkpoint(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """The checkpoint to resume run ``record`` from (see :func:`run_record`).

    Raises:
        RunStateError: no folder, no complete checkpoint, or only checkpoints of another run
            (the message names the recipe keys that differ).
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise RunStateError(f"--resume: {out} does not exist: there is no run to resume")
    found = checkpoints(out)
    complete = [(s, d) for s, d in found if (d / COMPLETE_MARKER).exists()]
    if not complete:
        why = (f"{len(found)} incomplete checkpoint(s) (killed while saving)" if found
               else "no checkpoint (the run stopped before its first save)")
        raise RunStateError(f"--resume: no complete checkpoint in {out}: {why}. Start it again "
                            f"without --resume (add --overwrite if the folder holds other files)")
    ident = record["identity"]
    mine = last_complete_checkpoint(out, ident)
    if mine is not None:
        return mine
    s, d = complete[-1]
    theirs = read_run_file(d)
    if theirs is None:
        raise RunStateError(f"--resume: {d} carries no run identity ({RUN_FILE}): it was not "
                            "written by this run, so it is not resumed")
    diff = _diff(theirs.get("identity_keys", {}), record["identity_keys"])
    raise RunStateError(f"--resume: the checkpoints in {out} belong to another run; the recipe "
                        f"differs in: {'; '.join(diff[:8]) or '?'}. Resume with the recipe the run "
                        f"was started with (plugtune train --resume {out}), or use --overwrite")


def completed_message(ckpt: str | Path, recipe) -> str | None:
    """Why resuming ``recipe`` from ``ckpt`` has nothing left to train, or ``None``.

    Read from the checkpoint's ``trainer_state.json`` (no torch import): the run is complete
    when ``global_step >= recipe.max_steps`` (``max_steps > 0``), or when all
    ``recipe.num_epochs`` epochs are done (``max_steps <= 0``). The transformers Trainer has no
    such check: resumed at ``global_step == max_steps`` it skips the trained batches, then trains
    one more step before its ``global_step >= max_steps`` test (which runs after each step) stops
    it, and saves over the final model.
    """
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    hint = "extend it with --set max_steps=M (or num_epochs)"
    if recipe.max_steps > 0:
        if step >= recipe.max_steps:
            return f"run already complete (step {step} of {recipe.max_steps}); {hint}"
        return None
    epoch = float(state.get("epoch") or 0.0)
    if epoch >= float(recipe.num_epochs) - 1e-6:
        return (f"run already complete (step {step} of {step}, epoch {epoch:g} of "
                f"{float(recipe.num_epochs):g}); {hint}")
    return None


# ---------------------------------------------------------------------------------------------
# the output folder


def run_artifacts(output_dir: str | Path) -> list[Path]:
    """Files/folders of a plugtune run in ``output_dir`` (checkpoints, weights, run files)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [d for _, d in checkpoints(out)]
    found += [out / n for n in RUN_FILES if (out / n).exists()]
    found += sorted(p for p in out.glob(".staging-*"))
    return found


def holds_a_run(output_dir: str | Path) -> bool:
    """True when ``output_dir`` holds weights, an adapter or a checkpoint of some run."""
    out = Path(output_dir)
    return bool(checkpoints(out)) or any((out / n).exists() for n in _VALUABLE)


def prepare_output_dir(recipe, resume: bool = False, overwrite: bool = False,
                       say=print, write: bool = True) -> Path | None:
    """Apply the folder policy for ``recipe.output_dir``; return the checkpoint to resume from.

    * neither flag: refuse a folder that :func:`holds_a_run`; otherwise write :data:`RUN_FILE`;
    * ``overwrite``: remove the files of :data:`RUN_FILES` and all checkpoints (each is named
      through ``say``), keep anything else, then start afresh;
    * ``resume``: :func:`select_checkpoint`, and remove incomplete checkpoints newer than it
      (half-written by a killed save; each named through ``say``).

    ``write=False`` (every rank but the first of a multi-process run) checks and chooses the
    same way but removes and writes nothing.

    Raises:
        RunStateError: both flags; the folder holds another run; nothing of this run to resume.
        RunAlreadyComplete: ``resume`` and the checkpoint already reached the run's end
            (:func:`completed_message`); nothing in the folder is touched.
    """
    if resume and overwrite:
        raise RunStateError("--resume and --overwrite exclude each other")
    out = Path(recipe.output_dir)
    record = run_record(recipe)
    if resume:
        ckpt = select_checkpoint(out, record)
        if (done := completed_message(ckpt, recipe)) is not None:
            raise RunAlreadyComplete(done)
        step = _step(ckpt)
        for s, d in checkpoints(out) if write else ():
            if s > step and not (d / COMPLETE_MARKER).exists():
                say(f"plugtune: removing incomplete {d} (a save that was interrupted)")
                shutil.rmtree(d)
        if write:
            write_run_file(out, record)
        return ckpt
    if holds_a_run(out) and not overwrite:
        items = [p.name for p in run_artifacts(out)]
        raise RunStateError(
            f"output_dir {out} holds another run ({', '.join(items[:6])}"
            f"{', ...' if len(items) > 6 else ''}). Continue it with "
            f"`plugtune train --resume {shlex.quote(str(out))}`, replace it with --overwrite, "
            "or choose another output_dir")
    if overwrite and write:
        for p in run_artifacts(out):
            say(f"plugtune: --overwrite: removing {p}")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if write:
        write_run_file(out, record)
    return None


def resume_command(output_dir: str | Path) -> str:
    """The shell command that continues the run in ``output_dir``."""
    return f"plugtune train --resume {shlex.quote(str(output_dir))}"


def interrupted_message(output_dir: str | Path) -> str:
    """What to print when a run stops early: the checkpoint that exists and how to resume."""
    out = Path(output_dir)
    ident = (read_run_file(out) or {}).get("identity")
    ckpt = last_complete_checkpoint(out, ident) if out.is_dir() else None
    if ckpt is None:
        return f"no checkpoint of this run was saved in {out}; start it again to train"
    return f"last complete checkpoint: {ckpt}; continue with: {resume_command(out)}"


def recipe_from_run(run_dir: str | Path, overrides: list[str] | None = None):
    """The recipe a run in ``run_dir`` was started with (from :data:`RUN_FILE`), with
    ``overrides`` applied and ``output_dir`` set to ``run_dir``.

    Raises:
        RunStateError: ``run_dir`` holds no run file (nothing to resume).
        plugtune.config.RecipeError: an override is invalid.
    """
    from plugtune.config import apply_overrides, validate_recipe

    run = Path(run_dir)
    rec = read_run_file(run)
    if rec is None or "recipe" not in rec:
        what = "does not exist" if not run.exists() else f"holds no {RUN_FILE}"
        raise RunStateError(f"--resume {run}: {what}, so there is no run to resume")
    data = apply_overrides(dict(rec["recipe"]), list(overrides or []))
    data["output_dir"] = str(run)
    return validate_recipe(data, source=str(run / RUN_FILE))
