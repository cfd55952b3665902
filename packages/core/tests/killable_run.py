"""Run ``plugtune`` in a subprocess that SIGKILLs itself at a chosen point (resume tests).

    python killable_run.py step N -- train ...   # killed inside the forward of step N
    python killable_run.py save N -- train ...   # killed inside the save of checkpoint-N, after
                                                 # the weights and optimizer, before the RNG
                                                 # state, trainer state and completion marker
    python killable_run.py none 0 -- train ...
"""

from __future__ import annotations

import os
import signal
import sys


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    kind, n = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    from transformers import Trainer

    from plugtune import train as train_mod
    from plugtune.cli import main as cli_main

    if kind == "step":
        orig = train_mod.PlugtuneTrainer.compute_loss

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training and self.state.global_step + 1 == n:
                _die()
            return orig(self, model, inputs, *a, **kw)

        train_mod.PlugtuneTrainer.compute_loss = compute_loss
    elif kind == "save":
        orig_save = Trainer._save_optimizer_and_scheduler

        def save(self, output_dir):
            orig_save(self, output_dir)
            if self.state.global_step == n:
                _die()

        Trainer._save_optimizer_and_scheduler = save
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
