"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740) through TRL's
``RLOOTrainer``: ``rl: rloo``. Same data, reward functions and keys as ``rl: grpo``
(:mod:`plugtune.methods.grpo`); the baseline of each completion is the mean reward of the other
completions of its prompt. TRL's default KL coefficient here is ``beta: 0.05``.
"""

from __future__ import annotations

from plugtune.hookspecs import hookimpl
from plugtune.methods.grpo import OnlineRLKeys
from plugtune.spec import Method

METHOD = Method(
    name="rloo",
    run="plugtune.methods.rloo:run",
    data_kinds=("chat",),
    keys=OnlineRLKeys,
    description="RLOO: online RL with a leave-one-out baseline (TRL RLOOTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx`` (:class:`plugtune.trainer.MethodContext`)."""
    from trl import RLOOConfig, RLOOTrainer

    from plugtune.methods.grpo import build_online_trainer

    return build_online_trainer(ctx, RLOOTrainer, RLOOConfig, 0.05)[:3]


def run(ctx):
    """Run RLOO (see :func:`plugtune.methods.grpo.run_online`)."""
    from trl import RLOOConfig, RLOOTrainer

    from plugtune.methods.grpo import run_online

    return run_online(ctx, RLOOTrainer, RLOOConfig, 0.05)
