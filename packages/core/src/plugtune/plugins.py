"""Plugin manager factory, plugin discovery and family routing.

Plugins are found through the entry-point group ``plugtune`` (entry-point name = distribution
name, e.g. ``plugtune-llama = "plugtune_llama.plugin"``). Environment variables, in the style
of ``llm`` and ``datasette``:

* ``PLUGTUNE_LOAD_PLUGINS``: comma-separated entry-point or module names; only these are loaded
  (an empty string loads none). A name that is not an installed entry point is imported as a
  module, so ``PLUGTUNE_LOAD_PLUGINS=my_local_plugin`` works without packaging.
* ``PLUGTUNE_DISABLE_PLUGINS``: comma-separated names that are not loaded.

There is no global manager built at import time: call :func:`get_plugin_manager`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from collections.abc import Mapping
from dataclasses import dataclass

import pluggy

from plugtune import hookspecs
from plugtune.spec import Family, Method

ENTRY_POINT_GROUP = "plugtune"
#: core's training methods, registered as built-in plugins (``plugtune_methods``); importing
#: them is cheap (no torch), so recipe validation can collect their keys
BUILTIN_METHODS = ("plugtune.methods.sft", "plugtune.methods.dpo", "plugtune.methods.kto",
                   "plugtune.methods.orpo", "plugtune.methods.cpo", "plugtune.methods.reward",
                   "plugtune.methods.grpo", "plugtune.methods.rloo")
DEFAULT_PLUGINS = ("plugtune.default_plugins.causal_lm", *BUILTIN_METHODS)


class PluginError(RuntimeError):
    """Base class of plugin discovery and routing errors."""


class PluginConflictError(PluginError):
    """Two plugins claim the same ``model_type``."""


class UnknownModelError(PluginError):
    """No installed plugin claims a model's ``model_type``."""


class UnknownMethodError(PluginError):
    """No installed plugin declares the recipe's training method (``rl:``)."""


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def get_plugin_manager(
    env: Mapping[str, str] | None = None, load_entrypoints: bool = True
) -> pluggy.PluginManager:
    """Build a fresh plugin manager with the default plugins and the installed ones.

    Args:
        env: environment to read ``PLUGTUNE_LOAD_PLUGINS`` / ``PLUGTUNE_DISABLE_PLUGINS`` from
            (default ``os.environ``).
        load_entrypoints: load plugins from the ``plugtune`` entry-point group.

    Raises:
        pluggy.PluginValidationError: a plugin implements a hook that does not exist
            (``check_pending``), e.g. a misspelt ``plugtune_laod``.
        PluginError: a plugin named in ``PLUGTUNE_LOAD_PLUGINS`` cannot be imported.
    """
    env = os.environ if env is None else env
    pm = pluggy.PluginManager("plugtune")
    pm.add_hookspecs(hookspecs)
    for mod in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(mod), name=mod)

    only = _split(env.get("PLUGTUNE_LOAD_PLUGINS"))
    disabled = set(_split(env.get("PLUGTUNE_DISABLE_PLUGINS")) or [])
    if load_entrypoints:
        seen: set[str] = set()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen or ep.name in disabled:
                continue
            if only is not None and ep.name not in only and ep.value not in only:
                continue
            seen.update((ep.name, ep.value))  # PLUGTUNE_LOAD_PLUGINS may name either
            try:
                plugin = ep.load()
            except Exception as exc:  # surface which plugin broke, not a bare ImportError
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            pm.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                pm._plugtune_dists = getattr(pm, "_plugtune_dists", {})  # type: ignore[attr-defined]
                pm._plugtune_dists[ep.name] = (dist.name, dist.version)  # type: ignore[attr-defined]
        for name in only or []:
            if name in seen or name in disabled or pm.has_plugin(name):
                continue
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise PluginError(
                    f"PLUGTUNE_LOAD_PLUGINS names {name!r}, which is neither an installed "
                    f"plugtune plugin nor an importable module: {exc}"
                ) from exc
            pm.register(module, name=name)
    pm.check_pending()
    return pm


def methods_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager holding only core's built-in methods: no family plugins, no entry
    points, no torch. Recipe validation uses it first (fast path, see
    :func:`plugtune.config.validate_recipe`)."""
    pm = pluggy.PluginManager("plugtune")
    pm.add_hookspecs(hookspecs)
    for mod in BUILTIN_METHODS:
        pm.register(importlib.import_module(mod), name=mod)
    return pm


def method_table(pm: pluggy.PluginManager) -> dict[str, tuple[str, Method]]:
    """``rl`` value (names and aliases) -> ``(plugin name, Method)`` from every
    ``plugtune_methods`` answer.

    Raises:
        PluginConflictError: two plugins declare one name or alias (message names both).
    """
    table: dict[str, tuple[str, Method]] = {}
    for impl in pm.hook.plugtune_methods.get_hookimpls():
        for method in impl.function() or []:
            for name in (method.name, *method.aliases):
                if name in table and table[name][0] != impl.plugin_name:
                    raise PluginConflictError(
                        f"training method {name!r} is declared by two plugins: "
                        f"{table[name][0]!r} and {impl.plugin_name!r}; uninstall one or set "
                        f"PLUGTUNE_DISABLE_PLUGINS={impl.plugin_name}")
                table[name] = (impl.plugin_name, method)
    return table


def resolve_method(pm: pluggy.PluginManager, name: str) -> Method:
    """The :class:`Method` whose name or alias is ``name``.

    Raises:
        UnknownMethodError: none; the message lists the installed methods.
    """
    table = method_table(pm)
    if name in table:
        return table[name][1]
    raise UnknownMethodError(
        f"unknown training method rl: {name!r}; installed methods: {describe_methods(table)}. "
        f"A method from another package is installed as a plugtune plugin (pip install "
        f"plugtune-<method>).")


def describe_methods(table: dict[str, tuple[str, Method]]) -> str:
    """``"dpo (aliases ipo; plugin x), sft (...)"``: one entry per method of ``table``."""
    seen: dict[str, str] = {}
    for plugin, m in table.values():
        alias = f"aliases {', '.join(m.aliases)}; " if m.aliases else ""
        seen[m.name] = f"{m.name} ({alias}plugin {plugin})"
    return ", ".join(seen[k] for k in sorted(seen)) or "none"


def recipe_key_models(pm: pluggy.PluginManager) -> tuple[type, ...]:
    """The pydantic models of plugin-contributed recipe keys: every method's
    :attr:`Method.keys` and every ``plugtune_recipe_keys`` answer, in registration order,
    without repeats."""
    out: list[type] = []
    for _, method in method_table(pm).values():
        if method.keys is not None and method.keys not in out:
            out.append(method.keys)
    for answer in pm.hook.plugtune_recipe_keys():
        for model in answer or []:
            if model not in out:
                out.append(model)
    return tuple(out)


@dataclass(frozen=True)
class Route:
    """Which plugin owns a ``model_type``."""

    plugin: str
    family: Family


def routing_table(pm: pluggy.PluginManager) -> dict[str, Route]:
    """``model_type -> Route`` built from every plugin's ``plugtune_families`` answer.

    Raises:
        PluginConflictError: two plugins claim one ``model_type`` (message names both).
    """
    table: dict[str, Route] = {}
    impls = pm.hook.plugtune_families.get_hookimpls()
    for impl in impls:
        families = impl.function() or []
        for fam in families:
            for mt in fam.model_types:
                if mt in table and table[mt].plugin != impl.plugin_name:
                    raise PluginConflictError(
                        f"model_type {mt!r} is claimed by two plugins: "
                        f"{table[mt].plugin!r} (family {table[mt].family.name!r}) and "
                        f"{impl.plugin_name!r} (family {fam.name!r}); uninstall one or set "
                        f"PLUGTUNE_DISABLE_PLUGINS={impl.plugin_name}"
                    )
                table[mt] = Route(impl.plugin_name, fam)
    return table


def resolve_family(pm: pluggy.PluginManager, model_type: str) -> Route:
    """The route for ``model_type``.

    Raises:
        UnknownModelError: no plugin claims it; the message lists installed families.
    """
    table = routing_table(pm)
    if model_type in table:
        return table[model_type]
    raise UnknownModelError(
        f"no installed plugtune plugin claims model_type {model_type!r}. "
        f"Installed families: {_listing(table)}. Install the plugin for this family "
        f"(e.g. pip install plugtune-<family>) or set model_type in the recipe."
    )


def route_model(pm: pluggy.PluginManager, model_type: str, config=None) -> tuple[Route, str]:
    """The route for a model: the plugin that claims ``model_type``, else the generic route
    decided from its config (:func:`plugtune.architectures.generic_route`).

    Args:
        model_type: ``config.json``'s ``model_type`` (or the recipe's override).
        config: the ``transformers`` config, ``None`` when transformers cannot build it.

    Returns:
        ``(route, note)``: ``note`` is ``""`` when a plugin claims ``model_type``, else the one
        line that says which generic route was taken.

    Raises:
        UnknownModelError: the model cannot take any route (encoder-only, encoder-decoder
            without a plugin, no generative class, unreadable config), or it is an image-text
            model and no installed plugin claims the generic ``image_text`` route
            ("install plugtune-vision"). The message says why and lists installed families.
        PluginConflictError: two plugins claim one model type.
    """
    from plugtune.architectures import IMAGE_TEXT, ArchitectureError, generic_route, route_line

    table = routing_table(pm)
    if model_type in table:
        return table[model_type], ""
    try:
        generic = generic_route(model_type, config)
    except ArchitectureError as exc:
        raise UnknownModelError(f"{exc}. Installed families: {_listing(table)}") from None
    if generic.model_type not in table:
        hint = ("pip install plugtune-vision (it serves image-text models through "
                "AutoModelForImageTextToText + AutoProcessor)" if generic.model_type == IMAGE_TEXT
                else f"install a plugin that claims {generic.model_type!r}")
        raise UnknownModelError(
            f"{model_type} ({generic.architecture}) takes the generic {generic.model_type!r} "
            f"route, which no installed plugtune plugin claims: {hint}. "
            f"Installed families: {_listing(table)}")
    route = table[generic.model_type]
    return route, route_line(model_type, generic, route.plugin)


def _listing(table: dict[str, Route]) -> str:
    fams: dict[str, list[str]] = {}
    for mt, route in table.items():
        fams.setdefault(f"{route.plugin}:{route.family.name}", []).append(mt)
    return "; ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(fams.items())) or "none"


def describe_plugins(pm: pluggy.PluginManager) -> list[dict]:
    """One dict per registered plugin: name, version, families, hooks implemented."""
    dists = getattr(pm, "_plugtune_dists", {})
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(
            h.name for h in pm.get_hookcallers(plugin) or [] if h.name.startswith("plugtune_")
        )
        fams = []
        if hasattr(plugin, "plugtune_families"):
            fams = [
                {"name": f.name, "model_types": list(f.model_types), "task": f.task}
                for f in plugin.plugtune_families() or []
            ]
        dist, version = dists.get(name, (None, None))
        if version is None:
            from plugtune import __version__

            version = __version__ if name.startswith("plugtune.") else "unknown"
        methods = []
        if hasattr(plugin, "plugtune_methods"):
            methods = [m.name for m in plugin.plugtune_methods() or []]
        out.append(
            {"name": name, "distribution": dist, "version": version, "families": fams,
             "methods": methods, "hooks": hooks}
        )
    return out
