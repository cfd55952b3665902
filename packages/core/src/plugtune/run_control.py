"""Trainer-side pieces of a run you can interrupt and resume exactly.

* :class:`RunControlCallback`: marks each checkpoint complete and stamps it with the run's
  identity (:mod:`plugtune.runstate`); turns SIGINT/SIGTERM into "save a checkpoint at this step,
  then stop" (a second signal aborts at once); logs the loss at every save and at the last step,
  so the loss of the steps before a checkpoint is in the checkpoint's log history and a resumed
  run logs the same numbers as an uninterrupted one.
* :class:`LossGuard`: the message that stops a run when the loss turns NaN/inf, or is exactly 0
  for :data:`ZERO_LOSS_STEPS` training micro-batches in a row that have trained tokens (the
  fp16 + 4-bit trap: the loss underflows to 0 before it turns NaN).
* :class:`SeededLengthGroupedSampler`: transformers' ``LengthGroupedSampler`` draws its order
  from the global torch RNG when ``iter()`` is called; a resumed run calls it before the
  checkpoint's RNG state is restored (``Trainer._inner_training_loop`` -> ``_load_rng_state``),
  so the resumed epoch's order differs. This sampler draws from a generator seeded with
  ``seed + epoch`` (accelerate's ``DataLoaderShard.set_epoch`` forwards the epoch), like
  accelerate's ``SeedableRandomSampler`` does for plain shuffling: the order of an epoch is a
  function of the seed and the epoch only.
* :func:`whole_run_loss`: the mean training loss over every step of the run from the log
  history (``Trainer.train().training_loss`` covers only the steps of the last session).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from plugtune.runstate import (
    COMPLETE_MARKER,
    RUN_FILE,
    TrainingInterrupted,
    interrupted_message,
    read_run_file,
    write_run_file,
)

log = logging.getLogger(__name__)

#: logged steps in a row with a loss of exactly 0.0 that stop the run
ZERO_LOSS_STEPS = 3


class RunControlCallback(TrainerCallback):
    """Checkpoint identity + completion marker, signal handling and log alignment.

    Each checkpoint gets a copy of the run folder's :data:`RUN_FILE` (written by
    :func:`plugtune.runstate.prepare_output_dir` when the run starts), then the completion
    marker. On the first SIGINT/SIGTERM the current step finishes, a checkpoint is saved and
    :class:`plugtune.runstate.TrainingInterrupted` is raised from ``on_save`` (so every method's
    trainer stops the same way, before writing a "finished" run); a second signal raises
    ``KeyboardInterrupt`` at once.

    Args:
        say: ``callable(str)`` for the notice printed on the first signal (default: log warning).
    """

    def __init__(self, say=None):
        self.say = say or log.warning
        self.interrupted: str | None = None
        self._previous: dict[int, object] = {}

    # --- signals -------------------------------------------------------------------------
    def _handler(self, signum, frame):
        if self.interrupted is not None:  # second signal: abort now
            self._restore()
            raise KeyboardInterrupt
        self.interrupted = signal.Signals(signum).name
        self.say(f"plugtune: {self.interrupted}: saving a checkpoint at the end of this step, "
                 "then stopping (press Ctrl-C again to abort at once)")

    def _restore(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        return control

    # --- flow ----------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted is not None:
            control.should_save = True
            control.should_training_stop = True
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True  # no loss is left unlogged behind a checkpoint
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        out = Path(args.output_dir)
        ckpt = out / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and args.process_index == 0:
            record = read_run_file(out)
            if record is not None:
                write_run_file(ckpt, record)
            tmp = ckpt / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"global_step": state.global_step, "time": time.time()}))
            os.replace(tmp, ckpt / COMPLETE_MARKER)
        if self.interrupted is not None:
            self._restore()
            raise TrainingInterrupted(f"{self.interrupted} at step {state.global_step}: "
                                      f"{interrupted_message(out)}")
        return control


class LossGuard:
    """Watches the loss of each training micro-batch; :meth:`check` returns why the run must
    stop (``None`` while it may go on)."""

    def __init__(self, zero_steps: int = ZERO_LOSS_STEPS):
        self.zero_steps = zero_steps
        self._zeros = 0

    def check(self, loss: torch.Tensor, step: int, trained_tokens: int | None) -> str | None:
        """``loss``: the micro-batch loss (0-dim); ``step``: the 1-based optimizer step it belongs
        to; ``trained_tokens``: label tokens in the micro-batch (``None``: unknown)."""
        value = loss.detach()
        if not torch.isfinite(value).all():
            return f"loss became {value.item()} at step {step}"
        if trained_tokens != 0 and float(value) == 0.0:
            self._zeros += 1
            if self._zeros >= self.zero_steps:
                return (f"loss was exactly 0 for {self._zeros} micro-batches in a row, up to step "
                        f"{step} (an underflow, e.g. fp16 with a 4-bit base)")
        else:
            self._zeros = 0
        return None


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """``LengthGroupedSampler`` whose order for epoch ``e`` is drawn from ``torch.Generator``
    seeded with ``seed + e`` (never from the global RNG), so a resumed run replays it exactly."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


def seeded_train_sampler(trainer, train_dataset=None):
    """The :class:`SeededLengthGroupedSampler` for ``trainer`` when its arguments ask for
    ``group_by_length`` over a single process and the dataset has a length column; else ``None``
    (the caller then uses the Trainer's own sampler)."""
    ds = train_dataset if train_dataset is not None else trainer.train_dataset
    a = trainer.args
    if (a.train_sampling_strategy != "group_by_length" or a.world_size > 1 or ds is None
            or a.length_column_name not in getattr(ds, "column_names", ())):
        return None
    seed = a.data_seed if a.data_seed is not None else a.seed
    return SeededLengthGroupedSampler(a.train_batch_size * a.gradient_accumulation_steps,
                                      list(ds[a.length_column_name]), seed)


def whole_run_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over all steps of the run, from the ``loss`` entries of
    ``log_history`` (each the mean over the steps since the previous one, weighted by that
    count). ``None`` when nothing was logged."""
    prev, total = 0, 0.0
    for h in log_history:
        if "loss" in h and "step" in h and h["step"] > prev:
            total += float(h["loss"]) * (h["step"] - prev)
            prev = h["step"]
    return total / prev if prev else None


def fix_train_loss_entry(log_history: list[dict], loss: float | None) -> None:
    """Replace the Trainer's final ``train_loss`` (last session only) with the whole-run one."""
    if loss is None:
        return
    for h in log_history:
        if "train_loss" in h:
            h["train_loss"] = loss


__all__ = ["RUN_FILE", "LossGuard", "RunControlCallback", "SeededLengthGroupedSampler", "ZERO_LOSS_STEPS",
           "fix_train_loss_entry", "seeded_train_sampler", "whole_run_loss"]
