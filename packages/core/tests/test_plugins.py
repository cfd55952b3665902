"""Plugin discovery, routing and the env-var switches."""

from __future__ import annotations

import sys
import types

import pluggy
import pytest

from plugtune import hookimpl
from plugtune.plugins import (
    PluginConflictError,
    PluginError,
    UnknownModelError,
    describe_plugins,
    get_plugin_manager,
    resolve_family,
    routing_table,
)
from plugtune.spec import Family


def _plugin_module(name: str, families: list[Family], **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def plugtune_families():
        return families

    mod.plugtune_families = plugtune_families
    for k, v in hooks.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def test_default_plugin_always_registered_and_routes_generic():
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": ""})
    assert pm.has_plugin("plugtune.default_plugins.causal_lm")
    route = resolve_family(pm, "causal_lm")
    assert route.plugin == "plugtune.default_plugins.causal_lm"
    assert route.family.task == "causal"


def test_load_plugins_env_imports_a_module_plugin():
    _plugin_module("fake_plugin_a", [Family("fakeA", ("fake_a",))])
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "fake_plugin_a"})
    assert resolve_family(pm, "fake_a").plugin == "fake_plugin_a"


def test_load_plugins_env_rejects_unknown_name():
    with pytest.raises(PluginError, match="no_such_plugin_xyz"):
        get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "no_such_plugin_xyz"})


def test_disable_plugins_env():
    _plugin_module("fake_plugin_b", [Family("fakeB", ("fake_b",))])
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "fake_plugin_b",
                                 "PLUGTUNE_DISABLE_PLUGINS": "fake_plugin_b"})
    assert not pm.has_plugin("fake_plugin_b")


def test_two_plugins_claiming_one_model_type_is_an_error_naming_both():
    _plugin_module("claim_one", [Family("one", ("shared_type",))])
    _plugin_module("claim_two", [Family("two", ("shared_type",))])
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "claim_one,claim_two"})
    with pytest.raises(PluginConflictError) as exc:
        routing_table(pm)
    msg = str(exc.value)
    assert "claim_one" in msg and "claim_two" in msg and "shared_type" in msg


def test_unclaimed_model_lists_installed_families():
    _plugin_module("fake_plugin_c", [Family("fakeC", ("fake_c",))])
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "fake_plugin_c"})
    with pytest.raises(UnknownModelError) as exc:
        resolve_family(pm, "gpt_nope")
    msg = str(exc.value)
    assert "gpt_nope" in msg and "fakeC" in msg and "causal_lm" in msg


def test_misspelt_hook_fails_loudly():
    mod = _plugin_module("typo_plugin", [Family("typo", ("typo_t",))])

    @hookimpl
    def plugtune_laod(spec):  # the typo
        return None

    mod.plugtune_laod = plugtune_laod
    with pytest.raises(pluggy.PluginValidationError, match="plugtune_laod"):
        get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "typo_plugin"})


def test_firstresult_claim_or_pass_beats_trylast_default():
    @hookimpl
    def plugtune_generate(spec, prompts):
        return ["mine"] * len(prompts) if spec == "mine" else None

    _plugin_module("gen_plugin", [Family("g", ("g_t",))], plugtune_generate=plugtune_generate)
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": "gen_plugin"})
    assert pm.hook.plugtune_generate(spec="mine", model=None, tokenizer=None, prompts=["a", "b"],
                                     max_new_tokens=1, images=None) == ["mine", "mine"]


def test_describe_plugins_lists_hooks_and_families():
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": ""})
    info = {p["name"]: p for p in describe_plugins(pm)}
    core = info["plugtune.default_plugins.causal_lm"]
    assert "plugtune_load" in core["hooks"] and "plugtune_generate" in core["hooks"]
    assert core["families"][0]["model_types"] == ["causal_lm"]


def test_every_hookspec_is_documented_and_prefixed():
    from plugtune import hookspecs

    specs = [n for n in dir(hookspecs) if n.startswith("plugtune_")]
    assert len(specs) >= 6
    for n in specs:
        fn = getattr(hookspecs, n)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{n} is undocumented"
