"""Liger kernels (``liger_kernel: true``): recipe keys, gating on CUDA + liger-kernel, and the
fallback to plugtune's label-only LM head. Liger itself needs Triton/CUDA, so the "on" path runs
here with a stand-in ``liger_kernel`` module that records what transformers asks it to patch."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from plugtune import kernels
from plugtune.config import RecipeError, load_recipe, validate_recipe

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}


@pytest.fixture(autouse=True)
def _fresh_notices():
    kernels._NOTIFIED.clear()
    yield
    kernels._NOTIFIED.clear()


def test_recipe_keys_validate():
    r = validate_recipe(BASE)
    assert r.liger_kernel is False and r.liger_kernel_config is None
    r = validate_recipe({**BASE, "liger_kernel": True, "liger_kernel_config": {"rope": False}})
    assert r.liger_kernel and r.liger_kernel_config == {"rope": False}
    with pytest.raises(RecipeError, match="liger_kernel_config"):
        validate_recipe({**BASE, "liger_kernel_config": {"ropee": True}})
    with pytest.raises(RecipeError, match="exclusive"):
        validate_recipe({**BASE, "liger_kernel_config": {"cross_entropy": True,
                                                         "fused_linear_cross_entropy": True}})
    with pytest.raises(RecipeError, match="did you mean 'liger_kernel'"):
        validate_recipe({**BASE, "liger_kernels": True})


def test_gating_cpu_and_missing_package_notice_once(caplog):
    r = validate_recipe({**BASE, "liger_kernel": True})
    assert kernels.plan_liger(validate_recipe(BASE), cuda=True, available=True) == kernels.LigerPlan(False)
    with caplog.at_level(logging.WARNING, logger="plugtune.kernels"):
        p = kernels.plan_liger(r, "llama", cuda=False, available=True)
        kernels.plan_liger(r, "llama", cuda=False, available=True)
    assert not p.enabled and "no CUDA device" in p.reason
    assert kernels.training_kwargs(p) == {}
    notices = [m for m in caplog.messages if "liger_kernel: true" in m]
    assert len(notices) == 1 and "label-only LM head" in notices[0]
    p = kernels.plan_liger(r, "llama", cuda=True, available=False)
    assert not p.enabled and "plugtune[liger]" in p.reason


def _fake_liger(monkeypatch, calls: list, types_: tuple = ("llama", "mistral")):
    """Stand-in ``liger_kernel`` package: the model-type table and the instance patcher."""
    root = types.ModuleType("liger_kernel")
    root.__path__ = []
    tr = types.ModuleType("liger_kernel.transformers")
    tr.__path__ = []
    mp = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mp.MODEL_TYPE_TO_APPLY_LIGER_FN = {t: object() for t in types_}
    tr._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((type(model).__name__, kw))
    for name, mod in (("liger_kernel", root), ("liger_kernel.transformers", tr),
                      ("liger_kernel.transformers.monkey_patch", mp)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_gating_on_cuda_with_liger_and_unsupported_type(monkeypatch):
    _fake_liger(monkeypatch, [])
    r = validate_recipe({**BASE, "liger_kernel": True, "liger_kernel_config": {"swiglu": False}})
    p = kernels.plan_liger(r, "llama", cuda=True, available=True)
    assert p.enabled and p.reason is None
    assert kernels.training_kwargs(p) == {"use_liger_kernel": True,
                                          "liger_kernel_config": {"swiglu": False}}
    p = kernels.plan_liger(r, "falcon", cuda=True, available=True)
    assert not p.enabled and "no kernels for model_type 'falcon'" in p.reason


def test_axolotl_keys_map_onto_liger_kernel():
    raw = {**BASE, "plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rope": True,
           "liger_glu_activation": False, "liger_rms_norm": None,
           "liger_fused_linear_cross_entropy": True}
    out = kernels.axolotl_to_plugtune(raw)
    assert "plugins" not in out and not any(k.startswith("liger_r") for k in out)
    r = validate_recipe(out)
    assert r.liger_kernel is True
    assert r.liger_kernel_config == {"rope": True, "swiglu": False, "fused_linear_cross_entropy": True}
    assert kernels.axolotl_to_plugtune({**BASE, "liger_rope": True}).get("liger_kernel") is None
    assert kernels.axolotl_to_plugtune({**BASE, "plugins": ["x.Other"]})["plugins"] == ["x.Other"]


def _demo(tmp_path, *extra):
    return load_recipe("demo", [f"output_dir={tmp_path / 'run'}", "datasets.0.max_samples=16",
                                "test_datasets=[]", "eval_metrics=[loss]", "max_steps=2",
                                "eval_before_training=false", "liger_kernel=true", *extra])


def _trained_model(monkeypatch):
    import plugtune.trainer as pt

    seen = {}
    base = pt.PlugtuneTrainer

    class Spy(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["trainer"] = self

    monkeypatch.setattr(pt, "PlugtuneTrainer", Spy)
    return seen


def test_cpu_fallback_trains_with_label_only_head(tmp_path, monkeypatch, caplog):
    seen = _trained_model(monkeypatch)
    from plugtune.train import train

    with caplog.at_level(logging.WARNING, logger="plugtune.kernels"):
        res = train(_demo(tmp_path))
    tr = seen["trainer"]
    assert tr.args.use_liger_kernel is False
    assert tr.model._plugtune_label_only_head is True  # plugtune's own head did the loss
    assert res.metrics["global_step"] == 2
    assert sum("no CUDA device" in m for m in caplog.messages) == 1


def test_enabled_path_hands_liger_to_transformers_and_uses_model_forward(tmp_path, monkeypatch):
    """CUDA faked at the gate only: the Trainer calls Liger's instance patcher with the recipe's
    config, and the loss comes from the (patched) model forward, not plugtune's head."""
    import transformers.integrations.liger as hf_liger

    calls: list = []
    _fake_liger(monkeypatch, calls)
    monkeypatch.setattr(kernels, "cuda_available", lambda: True)
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    monkeypatch.setattr(hf_liger, "is_liger_kernel_available", lambda: True)
    seen = _trained_model(monkeypatch)
    from plugtune.train import train

    train(_demo(tmp_path, "liger_kernel_config={rope: false}"))
    tr = seen["trainer"]
    assert tr.args.use_liger_kernel is True and tr.args.liger_kernel_config == {"rope": False}
    assert calls == [("LlamaForCausalLM", {"rope": False})]
    assert tr.model._plugtune_label_only_head is False
