"""Run by ``test_distributed.py``: train the demo recipe (LoRA, packed rows) for a few steps and
write every optimizer step's loss (and the run's world size) as JSON. Started either as a plain
process or under ``accelerate launch --num_processes N --cpu`` (DDP over gloo); only rank 0
writes.

    python ddp_worker.py OUT.json MICRO_BATCH_SIZE [--set key=value ...]
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    out, micro = sys.argv[1], int(sys.argv[2])
    extra = [a for a in sys.argv[3:] if a != "--set"]
    import torch

    torch.set_num_threads(1)
    import plugtune.trainer as pt
    from plugtune.config import load_recipe
    from plugtune.train import train

    seen: dict = {}
    base = pt.PlugtuneTrainer

    class Recording(base):
        def training_step(self, model, *a, **kw):
            seen.setdefault("wrapper", type(self.model_wrapped).__name__)
            seen.setdefault("fsdp", bool(getattr(self, "is_fsdp_enabled", False)))
            p = next(q for q in self.model.parameters() if q.requires_grad)
            seen.setdefault("param_type", type(p.data).__name__)  # DTensor when sharded
            return super().training_step(model, *a, **kw)

    pt.PlugtuneTrainer = Recording

    recipe = load_recipe("demo", [
        f"output_dir={out}.run", "datasets.0.max_samples=256", "test_datasets=[]",
        "eval_metrics=[loss]", "eval_before_training=false", "max_steps=4", "logging_steps=1",
        "warmup_steps=0", "lr_scheduler=constant", "learning_rate=0.5", "optimizer=sgd",
        "adapter=lora",
        "lora_dropout=0", "save_total_limit=1", f"micro_batch_size={micro}", *extra])
    res = train(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [h["loss"] for h in res.log_history if "loss" in h]
        with open(out, "w") as fh:
            json.dump({"losses": losses, "world_size": int(os.environ.get("WORLD_SIZE", "1")), **seen,
                       "metrics": {k: v for k, v in res.metrics.items()
                                   if isinstance(v, int | float)}}, fh)


if __name__ == "__main__":
    main()
