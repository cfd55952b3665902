"""More than one process: ``accelerate launch --multi_gpu --num_processes 2`` on CPU (DDP over
gloo) gives the same per-step losses and the same saved adapter as one process with the same
global batch, with packed rows and LoRA; the ``fsdp:`` key resolves to the FSDP2 plugin that
accelerate builds (accelerate applies FSDP only on GPUs: on CPU a notice, then DDP).

Packed rows hold different numbers of trained tokens, so a per-rank mean would weight the ranks'
tokens unequally; transformers' ``average_tokens_across_devices`` (default on) sums the label
count over all ranks (``num_items_in_batch``) and plugtune's loss divides by that and is scaled
by the number of processes, which the gradient mean of DDP / FSDP undoes. accelerate hands batch
``i`` of the seeded sampler to rank ``i % N``, so N ranks with micro-batch B see the rows one
process sees with micro-batch N*B. On CPU accelerate joins the launcher's process group only
with ``ACCELERATE_USE_CPU`` set, which plugtune sets itself (``scale.ensure_cpu_process_group``):
the launch below runs without it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    env.pop("ACCELERATE_USE_CPU", None)  # plugtune sets it for a CPU launch (scale.py)
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    _run([sys.executable, str(WORKER), str(d / "one.json"), "8"], d)
    return json.loads((d / "one.json").read_text()), d / "one.json.run"


def test_two_processes_match_one_with_the_same_global_batch(one_process, tmp_path):
    a, a_dir = one_process
    out = tmp_path / "two.json"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_free_port()), str(WORKER), str(out), "4"], tmp_path)
    b = json.loads(out.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["wrapper"] == "DistributedDataParallel"
    assert len(a["losses"]) == len(b["losses"]) == 4
    assert a["losses"][0] > a["losses"][-1]  # it learns
    # same rows per step, same normalisation: equal up to float reduction order. SGD, since
    # Adam's first step is ~lr*sign(grad) and turns 1e-7 reduction noise into visible drift
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-5)
    # rank 0 writes the adapter once
    wa = load_file(a_dir / "adapter_model.safetensors")
    wb = load_file(out.with_name("two.json.run") / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wb[k].shape == wa[k].shape
        assert (wb[k] - wa[k]).abs().max() < 1e-5, k


def test_materializing_the_demo_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    """Else the run that first writes the demo model initialises LoRA differently from the
    runs (and ranks) after it, and one-process vs N-process losses differ after step 1."""
    import torch

    from plugtune import demo

    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    demo.materialize("demo://tiny-llama")
    assert torch.equal(torch.rand(3), want)


# --- fsdp: recipe key ---------------------------------------------------------------------------

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}


def test_fsdp_presets_and_files_resolve_and_validate(tmp_path):
    from plugtune.scale import FSDPConfigError, fsdp_config

    assert fsdp_config("full_shard") == {"version": 2, "reshard_after_forward": True}
    assert fsdp_config("shard_grad_op")["reshard_after_forward"] is False
    assert fsdp_config("full_shard_offload", gradient_checkpointing=True) == {
        "version": 2, "reshard_after_forward": True, "cpu_offload": True,
        "activation_checkpointing": True}
    good = tmp_path / "fsdp.json"
    good.write_text(json.dumps({"fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}))
    assert fsdp_config(str(good)) == {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    with pytest.raises(FSDPConfigError, match="did you mean 'full_shard'"):
        fsdp_config("full_shards")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"reshard_after_foward": True}))
    with pytest.raises(FSDPConfigError, match=r"typo.json: reshard_after_foward: unknown key; did you mean 'reshard_after_forward'"):
        fsdp_config(str(typo))
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "version": 2,\n}')
    with pytest.raises(FSDPConfigError, match=r"broken.json:3: malformed JSON"):
        fsdp_config(str(broken))
    (tmp_path / "v.json").write_text(json.dumps({"version": 2, "reshard_after_forward": "yes"}))
    with pytest.raises(FSDPConfigError, match="FSDP2 takes true"):
        fsdp_config(str(tmp_path / "v.json"))


def test_fsdp_recipe_reaches_accelerates_fsdp2_plugin(tmp_path, monkeypatch):
    """Recipe -> TrainingArguments -> the FullyShardedDataParallelPlugin the Trainer builds."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from plugtune.config import RecipeError, validate_recipe
    from plugtune.trainer import training_kwargs

    with pytest.raises(RecipeError, match="exclusive"):
        validate_recipe({**BASE, "fsdp": "full_shard", "deepspeed": "zero2"})
    with pytest.raises(RecipeError, match="deepspeed: zero3 for QLoRA"):
        validate_recipe({**BASE, "fsdp": "full_shard", "adapter": "qlora"})
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a launcher; FSDP needs one
    r = validate_recipe({**BASE, "fsdp": "shard_grad_op", "output_dir": str(tmp_path)})
    spec = type("S", (), {"torch_dtype": None, "quantization": None, "task": "causal",
                          "recipe": r, "model_type": "llama", "hf_config": None})()
    import transformers

    kw = training_kwargs(r, spec, False)
    monkeypatch.delenv("WORLD_SIZE")
    args = transformers.TrainingArguments(**kw)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["reshard_after_forward"] is False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.auto_wrap_policy is not None  # per decoder layer (_no_split_modules)


def test_fsdp_without_gpus_says_so_and_trains(tmp_path, caplog):
    import logging

    from plugtune.config import load_recipe
    from plugtune.train import train

    r = load_recipe("demo", [f"output_dir={tmp_path / 'run'}", "datasets.0.max_samples=16",
                             "test_datasets=[]", "eval_metrics=[loss]", "max_steps=1",
                             "eval_before_training=false", "fsdp=full_shard"])
    with caplog.at_level(logging.INFO, logger="plugtune.train"):
        res = train(r)
    assert res.metrics["global_step"] == 1
    assert any("fsdp: full_shard needs a multi-process launch" in m for m in caplog.messages)
