"""The measured workloads; each runs in its own process (``run.py --worker``) so peak RSS and
warm caches never mix between runs.

(a) ``plugtune``     ``plugtune.train.train(recipe)`` with ``sample_packing: true`` (the
                     trainer class is swapped for a subclass that only adds the step clock and
                     the token counter; data, collate hook, train-step hook are plugtune's own)
(b) ``trl_default``  TRL ``SFTTrainer`` defaults (padding, no packing), but fp32 and no gradient
                     checkpointing like (a): TRL defaults to bf16 + checkpointing, 3-24x slower on
                     this CPU (../shared/FINDINGS.md), which would measure dtype, not data layout
(c) ``trl_packing``  the same with ``packing=True`` (best-fit decreasing, padding-free rows)
(d) ``bare_loop``    forward, backward, optimizer step on the first micro-batches of (a)'s own
                     Trainer dataloader, collated to tensors before the clock starts, with
                     (a)'s model, loss (the ``plugtune_train_step`` hook) and optimizer: the
                     practical limit; then the same loop with the model's own ``.loss``
                     (what a hand-written loop does), reported as
                     ``model_loss_real_tokens_per_s``
``prep_scaling``     plugtune data preparation on 1x, 4x, 16x the Dolly file

Every training workload reports real (non-pad) tokens/s over steps ``warmup+1..N`` measured from
the end of step ``warmup`` to the end of step ``N`` (data loading, collation and logging
included), the pad fraction of the tensors fed to the model, the time before the first step, the
data-preparation time and the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` of ``/proc/self/status`` (Linux).

    Not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` across ``execve``, so a worker
    started by a parent holding 1 GB reports at least 1 GB (measured here: a 13 MB child of a
    967 MiB parent reports 967 MiB); ``VmHWM`` belongs to the new address space. Falls back to
    ``ru_maxrss`` where ``/proc`` is absent.
    """
    from plugtune.observe import proc_status_kib

    hwm = proc_status_kib().get("VmHWM")
    if hwm is not None:
        return hwm / 1024  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TokenCounter:
    """Real and total tokens of the micro-batches consumed by each optimizer step.

    The collator wrapper records ``(real, total)`` per collated micro-batch in collation order;
    optimizer step ``k`` consumes micro-batches ``(k-1)*accum .. k*accum - 1`` of that order, so
    batches the data loader fetches ahead (accelerate looks one batch ahead) are never counted
    early, and no model hook is needed (plugtune's loss does not call ``model.forward``).
    """

    def __init__(self) -> None:
        self.cum_real: list[int] = [0]
        self.cum_total: list[int] = [0]

    def wrap(self, collate):
        return CountingCollator(collate, self)

    def add(self, real: int, total: int) -> None:
        self.cum_real.append(self.cum_real[-1] + real)
        self.cum_total.append(self.cum_total[-1] + total)

    def upto(self, n_batches: int) -> tuple[int, int]:
        """``(real, total)`` tokens of the first ``n_batches`` micro-batches.

        Raises:
            RuntimeError: fewer micro-batches were collated (the count would be wrong).
        """
        if n_batches >= len(self.cum_real):
            raise RuntimeError(f"step needs {n_batches} micro-batches, only {len(self.cum_real) - 1} collated")
        return self.cum_real[n_batches], self.cum_total[n_batches]


class CountingCollator:
    """Calls ``inner`` and records the real token count (sum of the features' lengths) and the
    tensor positions (``input_ids.numel()``) of the batch."""

    def __init__(self, inner, counter: TokenCounter):
        self.inner = inner
        self.counter = counter

    def __call__(self, features):
        batch = self.inner(features)
        self.counter.add(sum(len(f["input_ids"]) for f in features), int(batch["input_ids"].numel()))
        return batch


def _step_clock(counter: TokenCounter, record: dict):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            record.setdefault("first_step_at", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            real, total = counter.upto(state.global_step * args.gradient_accumulation_steps)
            record.setdefault("step_end_s", []).append(time.perf_counter())
            record.setdefault("cum_real", []).append(real)
            record.setdefault("cum_total", []).append(total)

    return StepClock()


def _capture_losses(trainer, store: list) -> None:
    """Keep every micro-batch's training loss (detached, no sync) whatever the logging
    interval, by wrapping ``trainer.compute_loss``; read with :func:`_loss_ends`."""
    inner = trainer.compute_loss

    def compute_loss(*a, **kw):
        out = inner(*a, **kw)
        if trainer.model.training:
            store.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = compute_loss


def _loss_ends(store: list, accum: int = 1) -> dict:
    """First and last optimizer step's loss from :func:`_capture_losses`: the SUM of the
    step's micro-batch losses, since transformers 5 divides each micro-batch's summed token
    loss by the whole step's label count (``num_items_in_batch``)."""
    if len(store) < accum:
        return {"first_loss": None, "last_loss": None}
    step = [float(x) for x in store]
    return {"first_loss": round(sum(step[:accum]), 4),
            "last_loss": round(sum(step[-accum:]), 4), "steps_with_loss": len(step) // accum}


def _result(cfg: dict, record: dict, extra: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from measure import pad_fraction, steady_throughput

    warm = cfg["warmup"]
    thr = steady_throughput(record["step_end_s"], record["cum_real"], warm)
    tot = record["cum_total"][-1] - record["cum_total"][warm - 1]
    out = {
        "method": cfg["method"], "model": cfg["model_name"],
        "real_tokens_per_s": round(thr["tokens_per_s"], 1),
        "real_tokens_per_s_median": round(thr["tokens_per_s_median"], 1),
        "s_per_step": round(thr["s_per_step"], 4),
        "real_tokens_per_step": round(thr["tokens_per_step"], 1),
        "measured_steps": thr["steps"], "warmup_steps": warm,
        "pad_fraction": round(pad_fraction(thr["real_tokens"], tot), 4),
        "time_to_first_step_s": round(record["first_step_at"] - T_START, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "torch_threads": cfg["threads"],
    }
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------


#: the LoRA of LoRA workloads, the same in plugtune's recipe and TRL's ``peft_config``
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}


def _recipe(cfg: dict, packing: bool, out_dir: str):
    from plugtune.config import validate_recipe

    lora = dict(lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                lora_target_modules=LORA["targets"]) if cfg.get("adapter") == "lora" else {}
    return validate_recipe(dict(
        **lora, base_model=cfg["model_dir"], adapter=cfg.get("adapter", "none"), dtype="fp32",
        sample_packing=packing,
        # --long-rows: one packed row of rows_per_batch * sequence_len per micro-batch
        multipack_real_batches=not cfg.get("long_rows", False),
        sequence_len=cfg["sequence_len"], micro_batch_size=cfg["rows_per_batch"],
        chat_template="alpaca", datasets=cfg["datasets"], max_steps=cfg["warmup"] + cfg["steps"],
        **({"logging_steps": cfg["logging_steps"]} if cfg.get("logging_steps") else {}),
        output_dir=out_dir, save_total_limit=1,
        learning_rate=2e-4))


def run_plugtune(cfg: dict) -> dict:
    """(a) ``plugtune.train.train`` with packing; the Trainer subclass only adds measurement."""
    import plugtune.train as pt
    import plugtune.trainer as ptr

    counter, record, prep, losses = TokenCounter(), {}, {}, []
    real_prepare, base = pt.prepare, ptr.PlugtuneTrainer

    def timed_prepare(*a, **kw):
        t = time.perf_counter()
        data = real_prepare(*a, **kw)
        prep["data_prep_s"] = round(time.perf_counter() - t, 2)
        prep["stats"] = {k: v for k, v in data.stats.items() if k not in ("per_dataset", "eval")}
        prep["floor"] = packing_floor(data.train, cfg["sequence_len"])
        return data

    class MeasuredTrainer(base):
        def __init__(self, *a, data_collator=None, callbacks=None, **kw):
            super().__init__(*a, data_collator=counter.wrap(data_collator),
                             callbacks=[*(callbacks or []), _step_clock(counter, record)], **kw)
            prep["collator"] = type(data_collator).__qualname__
            prep["optimizer"] = self.args.optim
            prep["logging_steps"] = self.args.logging_steps
            prep["model"] = self.model
            _capture_losses(self, losses)

    pt.prepare, ptr.PlugtuneTrainer = timed_prepare, MeasuredTrainer
    with tempfile.TemporaryDirectory() as out:
        pt.train(_recipe(cfg, True, out))
    st = prep["stats"]
    n_samples = st["kept"] + st["truncated"]
    return _result(cfg, record, {
        "data_prep_s": prep["data_prep_s"], "collator": prep["collator"], "optimizer": prep["optimizer"],
        "rows": st["rows"], "samples": n_samples, "dropped_samples": st["dropped"],
        "mean_sample_len": round(st["real_tokens"] / max(n_samples, 1), 2),
        "trained_fraction": round(st["trained_tokens"] / max(st["real_tokens"], 1), 4),
        **_loss_ends(losses, 1), "logging_steps": prep["logging_steps"],
        "packing_floor": prep.get("floor"),
        **_model_facts(prep["model"])})


def packing_floor(train, capacity: int) -> dict:
    """Rows plugtune packed vs the fewest any packing of these whole samples could use
    (:func:`measure.pad_floor`), from the packed rows' restarting ``position_ids``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from measure import pad_floor

    if "position_ids" not in train.column_names:
        return {}
    lens = []
    for row in train["position_ids"]:
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        lens += [b - a for a, b in zip(starts, starts[1:])]
    return {"packed_rows": len(train), "sample_lengths_sum": sum(lens), "sample_lengths": lens,
            **pad_floor(lens, capacity)}


def _model_facts(model) -> dict:
    """Attention implementation, whether plugtune's label-only LM head loss was used, and the
    arithmetic per token that :func:`measure.flop_ceiling` needs (linear layers besides the LM
    head, LoRA's included; the head; query heads x head dim; layers)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    head = base.get_output_embeddings()
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not head)
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(heads, 1)
    return {"attn_implementation": cfg._attn_implementation,
            "label_only_head": getattr(base, "_plugtune_label_only_head", None),
            "linear_macs_per_token": linear,
            "head_macs_per_token": head.in_features * head.out_features if head is not None else 0,
            "attn_width": heads * head_dim, "layers": cfg.num_hidden_layers}


def _canonical(cfg: dict):
    from plugtune.config import DatasetConfig
    from plugtune.data.loading import load_datasets

    ds, _ = load_datasets([DatasetConfig(**d) for d in cfg["datasets"]], None, 42)
    return ds


def run_trl(cfg: dict) -> dict:
    """(b)/(c) TRL ``SFTTrainer`` on the same examples as conversational prompt/completion
    pairs (rendered with the same alpaca chat template), defaults except fp32 / no gradient
    checkpointing / ``max_length`` / batch shape / steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from plugtune.data.templates import ensure_chat_template

    packing = cfg["method"] == "trl_packing"
    counter, record = TokenCounter(), {}
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    ensure_chat_template(tok, "alpaca")
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ds = _canonical(cfg)
    ds = ds.map(lambda ex: {"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]},
                remove_columns=ds.column_names)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_steps=cfg["warmup"] + cfg["steps"], report_to="none",
            save_strategy="no", seed=42,
            **({"logging_steps": cfg["logging_steps"]} if cfg.get("logging_steps") else {}),
            bf16=False, gradient_checkpointing=False,  # fp32 / no GC like (a): see module doc
            max_length=cfg["sequence_len"], packing=packing,
            per_device_train_batch_size=cfg["micro_batch"],
            gradient_accumulation_steps=cfg["grad_accum"], learning_rate=2e-4)
        peft_config = None
        if cfg.get("adapter") == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                     lora_dropout=LORA["dropout"], target_modules=LORA["targets"],
                                     task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[_step_clock(counter, record)], peft_config=peft_config)
        prep_s = time.perf_counter() - t
        collator = type(trainer.data_collator).__qualname__
        padding_free = getattr(trainer.data_collator, "padding_free", None)
        trainer.data_collator = counter.wrap(trainer.data_collator)
        losses: list = []
        _capture_losses(trainer, losses)
        lengths = trainer.train_dataset["input_ids"]
        n_rows = len(lengths)
        trainer.train()
        logging_steps = trainer.args.logging_steps
        optim = trainer.args.optim
    return _result(cfg, record, {
        "data_prep_s": round(prep_s, 2), "model_load_s": round(load_s, 2), "collator": collator,
        "padding_free": padding_free, "optimizer": str(optim), "rows": n_rows,
        "micro_batch": cfg["micro_batch"], "grad_accum": cfg["grad_accum"],
        **_loss_ends(losses, cfg["grad_accum"]), "logging_steps": logging_steps,
        "attn_implementation": model.config._attn_implementation})


class _BareDone(Exception):
    """Raised from the hijacked ``Trainer.train`` once the bare loop has run."""


def run_bare(cfg: dict) -> dict:
    """(d) the practical limit on (a)'s own tensors, and (a) itself again in the same process.

    ``plugtune.train.train`` builds everything as in (a) (model, data, collator, Trainer), then
    ``Trainer.train`` is replaced by:

    1. take the first ``warmup + inproc_steps`` micro-batches of the Trainer's own dataloader,
       collated to tensors before any clock starts, and an optimizer from the Trainer's
       ``create_optimizer`` (same class, fused AdamW by default, same parameter groups);
    2. alternate, on those same batches: bare loop, the real ``Trainer.train``, bare loop,
       ``Trainer.train`` (ABAB). The bare loop is ``loss = plugtune_train_step(batch)``,
       ``backward``, ``step``, ``zero_grad`` and nothing else (no clipping, scheduler,
       logging, callbacks or data loading). Each phase skips its first step. Running both in
       one process removes process-to-process variation (allocator and page-fault state:
       8-30 % between processes here), which is larger than the Trainer's own cost;
    3. peak RSS is read after the first bare loop (before any Trainer run or step 4);
    4. (d') the bare loop on the same batches with the model's own ``model(**batch).loss``
       (full LM head), what a hand-written loop usually does.
    """
    import torch

    import plugtune.train as pt
    import plugtune.trainer as ptr

    sys.path.insert(0, str(Path(__file__).parent))
    from measure import steady_throughput

    prep: dict = {}
    real_prepare, base = pt.prepare, ptr.PlugtuneTrainer

    def timed_prepare(*a, **kw):
        t = time.perf_counter()
        data = real_prepare(*a, **kw)
        prep["data_prep_s"] = time.perf_counter() - t
        return data

    class BareTrainer(base):
        def __init__(self, *a, data_collator=None, **kw):
            self._inner_collator = data_collator
            self._counter = TokenCounter()
            super().__init__(*a, data_collator=self._counter.wrap(data_collator), **kw)

        def train(self, *a, **kw):
            t = time.perf_counter()
            n = cfg["warmup"] + cfg["steps"]
            accum = self.args.gradient_accumulation_steps
            batches = []
            for batch in self.get_train_dataloader():
                batches.append(batch)
                if len(batches) == n * accum:
                    break
            if len(batches) < n * accum:
                raise RuntimeError(f"only {len(batches)} micro-batches, need {n * accum}")
            counter = self._counter
            prep["collate_s"] = time.perf_counter() - t
            model = self.model
            model.train()
            self.create_optimizer()
            opt, self.optimizer = self.optimizer, None  # the Trainer phases make their own
            prep["optimizer"] = f"{type(opt).__module__}.{type(opt).__qualname__}" + (
                " (fused)" if opt.defaults.get("fused") else "")
            pm, spec = self.pm, self.spec

            def plugtune_step(batch, n_items):
                return pm.hook.plugtune_train_step(spec=spec, model=model, batch=batch,
                                                   num_items_in_batch=n_items)

            def model_step(batch, n_items):
                return model(**batch, use_cache=False).loss / accum

            def loop(step_fn) -> tuple[dict, list]:
                record: dict = {"first_step_at": time.perf_counter()}
                losses = []
                for step in range(n):
                    micro = batches[step * accum:(step + 1) * accum]
                    n_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)
                    for batch in micro:
                        loss = step_fn(batch, torch.tensor(n_items) if accum > 1 else None)
                        loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    real, total = counter.upto((step + 1) * accum)
                    record.setdefault("step_end_s", []).append(time.perf_counter())
                    record.setdefault("cum_real", []).append(real)
                    record.setdefault("cum_total", []).append(total)
                    losses.append(round(loss.item() * accum, 4))
                return record, losses

            def trainer_phase() -> dict:
                fresh = TokenCounter()
                record: dict = {}
                self.data_collator = fresh.wrap(self._inner_collator)
                self.optimizer, self.lr_scheduler = None, None
                clock = _step_clock(fresh, record)
                self.add_callback(clock)
                try:
                    base.train(self, *a, **kw)
                finally:
                    self.remove_callback(clock)
                if fresh.cum_real[1:n * accum + 1] != counter.cum_real[1:n * accum + 1]:
                    raise RuntimeError("the Trainer phase saw other batches than the bare loop")
                return record

            phases = []
            for kind in ("bare", "trainer", "bare", "trainer"):
                if kind == "bare":
                    rec, losses = loop(plugtune_step)
                    if "record" not in prep:
                        prep["record"], prep["losses"] = rec, losses
                        prep["peak_rss_mib"] = _peak_rss_mib()
                else:
                    rec = trainer_phase()
                thr = steady_throughput(rec["step_end_s"], rec["cum_real"], 1)
                phases.append({"phase": kind, "real_tokens_per_s": round(thr["tokens_per_s"], 1),
                               "s_per_step": round(thr["s_per_step"], 4),
                               "seconds": thr["seconds"], "real_tokens": thr["real_tokens"]})
            prep["phases"] = phases
            rec2, _ = loop(model_step)
            prep["model_loss"] = steady_throughput(rec2["step_end_s"], rec2["cum_real"], 1)
            prep["model"] = model
            raise _BareDone

    pt.prepare, ptr.PlugtuneTrainer = timed_prepare, BareTrainer
    with tempfile.TemporaryDirectory() as out:
        try:
            pt.train(_recipe(cfg, True, out))
        except _BareDone:
            pass

    def pooled(kind: str) -> float:
        ph = [p for p in prep["phases"] if p["phase"] == kind]
        return sum(p["real_tokens"] for p in ph) / sum(p["seconds"] for p in ph)

    bare, trainer = pooled("bare"), pooled("trainer")
    thr = prep["model_loss"]
    res = _result({**cfg, "warmup": 1}, prep["record"], {
        "data_prep_s": round(prep["data_prep_s"], 2), "collate_s": round(prep["collate_s"], 2),
        "optimizer": prep["optimizer"], "loss": "plugtune_train_step",
        "first_loss": prep["losses"][0], "last_loss": prep["losses"][-1],
        "same_process": {"phases": prep["phases"], "bare_real_tokens_per_s": round(bare, 1),
                         "trainer_real_tokens_per_s": round(trainer, 1),
                         "a/d": round(trainer / bare, 3)},
        "model_loss_real_tokens_per_s": round(thr["tokens_per_s"], 1),
        "model_loss_real_tokens_per_s_median": round(thr["tokens_per_s_median"], 1),
        "model_loss_s_per_step": round(thr["s_per_step"], 4), **_model_facts(prep["model"])})
    # (d)'s throughput: both bare phases pooled (tokens / seconds), like (a)'s in-process twin
    res["first_phase_real_tokens_per_s"] = res["real_tokens_per_s"]
    res["real_tokens_per_s"] = round(bare, 1)
    res["peak_rss_mib"] = round(prep["peak_rss_mib"], 1)  # before any Trainer phase or (d')
    res["peak_rss_note"] = "read after the first bare loop"
    return res


def run_prep_scaling(cfg: dict) -> dict:
    """plugtune data preparation (load, template, tokenize + mask, pack) on the Dolly file
    replicated ``scales`` times; a fresh datasets cache per size so nothing is reused."""
    import datasets

    import plugtune.data.pipeline as pipe
    from plugtune.config import validate_recipe
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    del datasets  # caching stays on: mapped results go to Arrow files on disk (memory-mapped)
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    pipe.load_datasets = timed("load", pipe.load_datasets)
    pipe.tokenize_dataset = timed("tokenize", pipe.tokenize_dataset)
    pipe.finalize = timed("filter_pack_stats", pipe.finalize)

    src = Path(cfg["dolly_file"])
    records = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    pm = get_plugin_manager()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        def recipe_for(path: Path):
            return validate_recipe(dict(
                base_model=cfg["model_dir"], adapter="none", sample_packing=True,
                sequence_len=cfg["sequence_len"], chat_template="alpaca", output_dir=tmp,
                datasets=[dict(path=str(path), type="dolly")]))

        spec = build_spec(recipe_for(src), pm)
        tok = pm.hook.plugtune_load(spec=spec).tokenizer
        sizes = cfg.get("samples") or [len(records) * s for s in cfg["scales"]]
        for scale in [0, *sizes]:  # 0: a 16-record warm-up, not reported; else a sample count
            path = Path(tmp) / f"dolly_{scale}.jsonl"
            with open(path, "w", encoding="utf-8") as fh:  # streamed: never all lines in a list
                for i in range(16 if scale == 0 else scale):
                    fh.write(records[i % len(records)] + "\n")
            rss_before = _peak_rss_mib()
            runs = []
            for rep in range(1 if scale == 0 else cfg.get("repeats", 1)):
                os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / f"cache{scale}-{rep}")
                phases.clear()
                t = time.perf_counter()
                data = pipe.prepare(recipe_for(path), tok)
                runs.append((time.perf_counter() - t, dict(phases), data.stats))
            if scale:
                secs, ph, stats = min(runs, key=lambda x: x[0])  # fastest of the repeats
                n = stats["samples"]
                points.append({"scale": round(scale / len(records), 2), "samples": n,
                               "seconds": round(secs, 3), "peak_rss_mib": round(_peak_rss_mib(), 1),
                               "peak_rss_before_mib": round(rss_before, 1),
                               "samples_per_s": round(n / secs, 1),
                               "ms_per_sample": round(1000 * secs / n, 3), "rows": stats["rows"],
                               "all_seconds": [round(x[0], 2) for x in runs],
                               "phases_s": {k: round(v, 3) for k, v in ph.items()}})
    return {"method": "prep_scaling", "points": points, "peak_rss_mib": round(_peak_rss_mib(), 1)}


WORKLOADS = {"plugtune": run_plugtune, "trl_default": run_trl, "trl_packing": run_trl,
             "bare_loop": run_bare, "prep_scaling": run_prep_scaling}


def worker_main(cfg_path: str) -> None:
    """Entry of a worker process: read the config JSON, run, write ``cfg["out"]``.

    The libraries every workload uses are imported first, and the clock behind
    ``time_to_first_step_s`` starts after them, so import time (the same for all) is reported
    apart as ``import_s``."""
    global T_START
    cfg = json.loads(Path(cfg_path).read_text())
    t = time.perf_counter()
    import datasets  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import plugtune.train  # noqa: F401

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    T_START = time.perf_counter()
    import_s = T_START - t
    with contextlib.redirect_stdout(sys.stderr):  # keep library chatter out of our pipe
        result = WORKLOADS[cfg["method"]](cfg)
    result["import_s"] = round(import_s, 2)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(cfg["out"]).write_text(json.dumps(result, indent=1, default=str))
