"""Training methods are plugins (``plugtune_methods``); plugins add recipe keys
(``plugtune_recipe_keys`` / ``Method.keys``) validated like core keys; validating a recipe
imports neither torch nor a method's trainer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
from pydantic import BaseModel, ConfigDict, Field

from plugtune import hookimpl
from plugtune.config import RecipeError, validate_recipe
from plugtune.plugins import (
    PluginConflictError,
    get_plugin_manager,
    method_table,
    resolve_method,
)
from plugtune.spec import Method

BASE = {"base_model": "tiny", "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}


class EchoKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")
    echo_strength: float = Field(1.0, gt=0)


def _echo_run(ctx):
    return ("ran", ctx.method.name, ctx.recipe.echo_strength)


def _method_plugin(name: str, method: Method, extra_keys=()) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def plugtune_methods():
        return [method]

    mod.plugtune_methods = plugtune_methods
    if extra_keys:
        @hookimpl
        def plugtune_recipe_keys():
            return list(extra_keys)

        mod.plugtune_recipe_keys = plugtune_recipe_keys
    sys.modules[name] = mod
    return mod


def _pm(*plugins):
    pm = get_plugin_manager(env={"PLUGTUNE_LOAD_PLUGINS": ""})
    for p in plugins:
        pm.register(p, name=p.__name__)
    return pm


def test_core_methods_are_builtin_plugins():
    pm = _pm()
    table = method_table(pm)
    assert table["sft"][0] == "plugtune.methods.sft" and table["dpo"][0] == "plugtune.methods.dpo"
    assert resolve_method(pm, "ipo").name == "dpo"  # axolotl's rl: ipo
    assert resolve_method(pm, "dpo").data_kinds == ("preference",)


def test_unknown_method_lists_installed_ones():
    with pytest.raises(RecipeError) as err:
        validate_recipe({**BASE, "rl": "dpoo"})
    msg = str(err.value)
    assert "rl" in msg and "'dpoo'" in msg and "dpo (aliases ipo" in msg and "sft" in msg


def test_method_keys_are_validated_like_core_keys():
    r = validate_recipe({**BASE, "rl": "dpo", "dpo_beta": 0.3})
    assert r.dpo_beta == 0.3 and r.method == "dpo"
    with pytest.raises(RecipeError, match=r"dpo_beta: Input should be greater than 0"):
        validate_recipe({**BASE, "dpo_beta": -1})
    with pytest.raises(RecipeError, match="did you mean 'dpo_beta'"):
        validate_recipe({**BASE, "dpo_betta": 0.3})


def test_reward_model_flag_is_the_reward_method():
    with pytest.raises(RecipeError, match="reward_model"):
        validate_recipe({**BASE, "rl": "dpo", "reward_model": True})


def test_third_party_method_with_its_own_keys(monkeypatch):
    class ExtraKeys(BaseModel):
        model_config = ConfigDict(extra="forbid")
        echo_note: str = "hi"

    plugin = _method_plugin("plugtune_echo_method", Method(
        name="echo", run=_echo_run, data_kinds=("chat",), keys=EchoKeys), extra_keys=[ExtraKeys])
    pm = _pm(plugin)
    r = validate_recipe({**BASE, "rl": "echo", "echo_strength": 2.5, "echo_note": "x"}, pm=pm)
    assert r.echo_strength == 2.5 and r.echo_note == "x"
    with pytest.raises(RecipeError, match=r"echo_strength: Input should be greater than 0"):
        validate_recipe({**BASE, "rl": "echo", "echo_strength": 0}, pm=pm)
    # without a pm the installed plugins are loaded when the built-ins do not know a key
    monkeypatch.setenv("PLUGTUNE_LOAD_PLUGINS", "plugtune_echo_method")
    assert validate_recipe({**BASE, "rl": "echo", "echo_strength": 3}).echo_strength == 3
    monkeypatch.setenv("PLUGTUNE_LOAD_PLUGINS", "")
    with pytest.raises(RecipeError, match="echo_strength: unknown key"):
        validate_recipe({**BASE, "echo_strength": 3})


def test_train_dispatches_to_the_plugin_method(monkeypatch):
    """``train`` resolves ``rl`` through the plugin manager and calls the method's ``run``."""
    from plugtune import train as train_mod

    plugin = _method_plugin("plugtune_echo_method2", Method(
        name="echo", run=_echo_run, data_kinds=("chat",), keys=EchoKeys))
    pm = _pm(plugin)
    recipe = validate_recipe({**BASE, "rl": "echo", "echo_strength": 4}, pm=pm)
    assert train_mod.resolve_run_method(recipe, pm, "chat").name == "echo"
    with pytest.raises(train_mod.TrainingError, match="rl: echo needs chat data"):
        train_mod.resolve_run_method(recipe, pm, "preference")
    plain = validate_recipe(BASE)
    assert train_mod.resolve_run_method(plain, pm, "preference").name == "dpo"
    assert train_mod.resolve_run_method(plain, pm, "chat").name == "sft"


def test_two_plugins_declaring_one_method_conflict():
    a = _method_plugin("plugtune_m_a", Method(name="same", run=_echo_run))
    b = _method_plugin("plugtune_m_b", Method(name="same", run=_echo_run))
    with pytest.raises(PluginConflictError, match="plugtune_m_a.*plugtune_m_b"):
        method_table(_pm(a, b))


def test_plugin_key_clashing_with_core_key_is_an_error():
    class Clash(BaseModel):
        learning_rate: float = 1.0

    pm = _pm(_method_plugin("plugtune_clash", Method(name="clash", run=_echo_run, keys=Clash)))
    with pytest.raises(RecipeError, match="learning_rate.*already defined by core"):
        validate_recipe(BASE, pm=pm)


def test_validating_a_recipe_imports_no_torch(tmp_path):
    """The schema-extension path (built-in methods' keys) stays light: c14 keeps config
    validation fast, before torch / transformers / trl are imported."""
    code = textwrap.dedent("""
        import sys
        from plugtune.config import validate_recipe
        r = validate_recipe({"base_model": "x", "rl": "dpo", "dpo_beta": 0.2,
                             "datasets": [{"path": "x.jsonl", "type": "preference"}]})
        heavy = [m for m in ("torch", "transformers", "trl", "peft", "datasets") if m in sys.modules]
        print(r.dpo_beta, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.2 []", out.stdout + out.stderr
