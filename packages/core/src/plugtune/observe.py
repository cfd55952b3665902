"""What a run tells you: live throughput and memory in the Trainer's own log lines, the run
summary, the ``report_to`` integrations checked before any model loads, and the one place
that decides which library warnings a run shows.

* :func:`real_tokens` / :func:`peak_memory_mib`: what
  :class:`plugtune.trainer.RunObserver` (a ``TrainerCallback``) adds to every logging step.
* :func:`run_metrics` / :func:`summary_lines`: the end-of-run numbers (``metrics.json``, the
  console summary).
* :func:`check_reporting`: ``report_to`` packages present before any model loads (else an
  error naming the ``plugtune[...]`` extra).
* :data:`QUIET_LOGS` / :data:`QUIET_WARNINGS` / :func:`quiet`: library notices that do not
  concern the run, hidden unless ``plugtune -v``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
import warnings
from typing import Any

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# quiet by default

#: ``(logger name, message prefix, why it is hidden)``: log records that do not concern the run.
#: Matched by logger *and* message start, never a whole library; ``plugtune -v`` shows them.
QUIET_LOGS: tuple[tuple[str, str, str], ...] = (
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer",
     "plugtune truncates/drops over-long samples itself and reports its own count "
     "(data_stats.json; one warning line above DATA_WARN_SHARE)"),
    ("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens",
     "plugtune sets the pad token on purpose (a base without one) and saves the aligned configs"),
)
#: loggers silenced below ERROR on a run whose base is not quantized: bitsandbytes (imported by
#: peft when installed) probes its optional CPU/GPU kernels at import and warns when the
#: ``kernels`` hub cannot be reached, although no quantized layer is used.
QUIET_UNLESS_QUANTIZED: tuple[str, ...] = ("bitsandbytes", "kernels")
#: ``(category, message regex, why)``: Python warnings that do not concern the run.
QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`(is_)?gradient_checkpointing\w*` is deprecated",
     "transformers 5 / peft renamed gradient -> activation checkpointing; raised by calls and "
     "config fields inside peft and TRL, not by the recipe (its key keeps axolotl's name)"),
    (FutureWarning, r".*`torch_dtype` is deprecated", "transformers 5 rename inside libraries"),
    (UserWarning, r"To copy construct from a tensor", "torch notice inside a library"),
)


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def quiet(verbose: bool = False, quantized: bool = False) -> None:
    """Hide the notices listed in :data:`QUIET_LOGS` and :data:`QUIET_WARNINGS` (and, when
    ``quantized`` is false, :data:`QUIET_UNLESS_QUANTIZED` below ERROR). ``verbose=True``
    (``plugtune -v``) removes these filters again: everything is shown. Idempotent."""
    for logger, flt in _installed:
        logger.removeFilter(flt)
    _installed.clear()
    for name in QUIET_UNLESS_QUANTIZED:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose or quantized else logging.ERROR)
    if verbose:
        for category, pattern, _ in QUIET_WARNINGS:
            warnings.filterwarnings("default", message=pattern, category=category)
        return
    for name, prefix, _ in QUIET_LOGS:
        logger, flt = logging.getLogger(name), _PrefixFilter(prefix)
        logger.addFilter(flt)
        _installed.append((logger, flt))
    for category, pattern, _ in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


# ---------------------------------------------------------------------------------------------
# report_to

#: ``report_to`` name -> the ``plugtune[...]`` extra that installs its package (the modules
#: each needs: :data:`plugtune.trainer_options.REPORT_MODULES`)
REPORT_EXTRAS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
                                 "comet_ml": "comet", "trackio": "trackio"}


class ReportingError(ValueError):
    """A ``report_to`` backend whose package is not installed."""


def reporters(recipe) -> list[str]:
    """The recipe's ``report_to`` as a list without ``none`` (``all``: kept as is)."""
    value = recipe.report_to
    names = [value] if isinstance(value, str) else list(value)
    return [n for n in names if n and n != "none"]


def check_reporting(recipe) -> None:
    """Check that every ``report_to`` backend can be imported; :func:`plugtune.train.train`
    calls it before any model loads (``all`` picks the installed ones: nothing to check).

    Raises:
        ReportingError: a backend's package is missing; the message names the
            ``pip install 'plugtune[EXTRA]'`` that installs it.
    """
    from plugtune.trainer_options import REPORT_MODULES

    for name in reporters(recipe):
        mods = REPORT_MODULES.get(name)
        if not mods or any(importlib.util.find_spec(m) is not None for m in mods):
            continue
        extra = REPORT_EXTRAS.get(name)
        how = f"pip install 'plugtune[{extra}]'" if extra else f"pip install {mods[0]}"
        raise ReportingError(f"report_to: {name} needs the {mods[0]!r} package, which is not "
                             f"installed: {how} (or set report_to: none)")


# ---------------------------------------------------------------------------------------------
# throughput and memory


def proc_status_kib(pid: int | str = "self", keys: tuple[str, ...] = ("VmHWM",)) -> dict[str, int]:
    """Memory lines of ``/proc/PID/status`` (Linux) in KiB, e.g. ``{"VmHWM": 812345}``.

    ``VmHWM`` is the peak resident set of that process's own address space; unlike
    ``getrusage().ru_maxrss`` it is not carried across ``execve`` (a child started by a parent
    holding 1 GB would otherwise report at least 1 GB). Keys that are absent, a process that
    is gone, or no ``/proc`` give an empty or partial dict.
    """
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in keys:
                    out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def peak_memory_mib(device: Any = None) -> float:
    """Peak memory of this process in MiB: ``torch.cuda.max_memory_allocated`` when ``device``
    is a CUDA device; else the resident set's high-water mark (``VmHWM``, see
    :func:`proc_status_kib`, or ``resource.getrusage`` ``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    dev = getattr(device, "type", device)
    if dev == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    hwm = proc_status_kib().get("VmHWM")
    if hwm is not None:
        return round(hwm / 1024, 1)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)


_ID_KEY = re.compile(r"^(.*?)(input_ids|_ids)$")


def real_tokens(inputs: dict, pad_token_id: int | None = None) -> int:
    """Real (non-padding) tokens of one training micro-batch of any method.

    Every ``*input_ids`` / ``*_ids`` tensor of shape ``(batch, seq)`` counts (SFT's, DPO's and
    the reward model's ``input_ids`` (chosen and rejected rows), KTO's ``input_ids`` +
    ``KL_input_ids``, GRPO's ``prompt_ids`` + ``completion_ids``; never ``*position_ids`` /
    ``*token_type_ids``): the
    ones of its mask (``attention_mask`` / ``*_attention_mask`` / ``*_mask``) when there is one,
    else (packed rows) the row length less its trailing run of ``pad_token_id``.
    """
    import torch

    total = 0
    for key, ids in inputs.items():
        m = _ID_KEY.match(key)
        if (m is None or key.endswith(("position_ids", "token_type_ids"))
                or not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dim() != 2):
            continue
        stem = m.group(1).rstrip("_")
        masks = ([f"{stem}_attention_mask", f"{stem}_mask"] if stem else ["attention_mask"])
        mask = next((inputs[k] for k in masks if torch.is_tensor(inputs.get(k))), None)
        if mask is not None and mask.shape == ids.shape:
            total += int(mask.sum())
        elif pad_token_id is None:
            total += ids.numel()
        else:  # packed rows (no mask): the collator pads only at the end of a row
            not_pad = (ids != pad_token_id).int()
            last = not_pad.shape[1] - not_pad.flip(1).argmax(1)
            total += int(torch.where(not_pad.any(1), last, 0).sum())
    return total


def run_metrics(observer, history: list[dict], started: float) -> dict[str, Any]:
    """The end-of-run numbers of ``metrics.json``: the observer's (:meth:`plugtune.trainer.RunObserver.metrics`),
    ``wall_seconds`` since ``started`` (``time.perf_counter()`` at run start: data, training,
    saving), and ``first_logged_loss`` / ``last_logged_loss`` when the run logged a loss."""
    out: dict[str, Any] = dict(observer.metrics())
    out["wall_seconds"] = round(time.perf_counter() - started, 2)
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        out["first_logged_loss"], out["last_logged_loss"] = losses[0], losses[-1]
    return out


def without_nulls(metrics: dict) -> dict:
    """``metrics`` without ``None`` values (nested dicts too): ``metrics.json`` holds only what
    was measured."""
    return {k: without_nulls(v) if isinstance(v, dict) else v
            for k, v in metrics.items() if v is not None}


def _fmt(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def summary_lines(metrics: dict, output_dir: Any) -> list[str]:
    """The end-of-run console summary (a few lines) from a run's metrics."""
    ev = metrics.get("eval_loss")
    return [
        f"plugtune: done in {_fmt(metrics.get('wall_seconds'), '.1f')} s "
        f"(training {_fmt(metrics.get('train_seconds'), '.1f')} s, "
        f"{metrics.get('global_step', '-')} steps)",
        f"  tokens seen {metrics.get('tokens_seen', 0):,}, "
        f"{_fmt(metrics.get('real_tokens_per_second'), ',.0f')} tokens/s, "
        f"peak memory {_fmt(metrics.get('peak_memory_mib'), ',.0f')} MiB",
        f"  train loss {_fmt(metrics.get('train_loss'))} (run mean; last logged "
        f"{_fmt(metrics.get('last_logged_loss'))})"
        + (f", eval loss {_fmt(ev)}" if ev is not None else ""),
        f"  run folder: {output_dir} (metrics.json, training.png, log_history.json)",
    ]
