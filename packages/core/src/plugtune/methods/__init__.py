"""Training methods, one module each, all of the same shape (like peft's ``tuners/<method>/``).

A method module declares a :class:`plugtune.spec.Method` and answers ``plugtune_methods`` with
it; core registers these modules as built-in plugins (``plugtune.plugins.BUILTIN_METHODS``),
exactly as a third-party ``plugtune-<method>`` package registers through its entry point. A
module holds, at its top, only what recipe validation needs (the ``Method`` and the pydantic
model of its recipe keys): torch, transformers and trl are imported inside ``run``.

``run(ctx)`` takes a :class:`plugtune.trainer.MethodContext` (prepared data, the loaded model
without an adapter), builds the method's Trainer, trains and writes the run directory
(:func:`plugtune.rundir.save_run`), returning a :class:`plugtune.trainer.RunResult`. No method
imports :mod:`plugtune.train`, which dispatches to them by name.
"""
