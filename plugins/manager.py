"""Load plugins (built-ins, the ``anymodal`` entry-point group, config-named modules) and collect
their components into registries."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pluggy

from ..core.registry import Registry
from . import hookspecs

__all__ = ["Components", "PluginError", "load_components", "ENTRY_POINT_GROUP", "KINDS"]

ENTRY_POINT_GROUP = "anymodal"
DISABLE_AUTOLOAD_ENV = "ANYMODAL_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN = "anymodal.plugins.builtin.components"
# hook name -> registry kind
KINDS = {
    "register_tokenizers": "tokenizer",
    "register_datasets": "dataset",
    "register_transforms": "transform",
    "register_maskers": "masker",
    "register_objectives": "objective",
    "register_teachers": "teacher",
}


class PluginError(RuntimeError):
    """A plugin failed to import, to register, or returned something the contract does not allow."""


@dataclass
class Components:
    """Every registered component, one registry per kind."""

    registries: dict[str, Registry] = field(default_factory=lambda: {k: Registry(k) for k in KINDS.values()})
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> where it came from
    manager: pluggy.PluginManager | None = None

    def __getattr__(self, kind: str) -> Registry:
        # components.tokenizer, components.masker, ...
        registries = self.__dict__.get("registries", {})
        if kind in registries:
            return registries[kind]
        raise AttributeError(kind)

    def configure(self, config: Any) -> list[Mapping[str, Any]]:
        assert self.manager is not None
        results = []
        for impl in self.manager.hook.configure.get_hookimpls():
            out = impl.function(config=config)
            if out is not None and not isinstance(out, Mapping):
                raise PluginError(f"plugin {impl.plugin_name!r}: hook configure returned {type(out).__name__}, expected a mapping or None")
            if out:
                results.append(out)
        return results


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    if pm.has_plugin(name) or pm.is_registered(plugin):
        return
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} does not match the hook contract: {e}") from e
    required = getattr(plugin, "ANYMODAL_API", hookspecs.API_VERSION)
    if required != hookspecs.API_VERSION:
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} targets plugin API version {required}, this anymodal provides {hookspecs.API_VERSION}")


def _import(module: str, plugin_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # any import-time failure is the plugin's; report it with its name
        raise PluginError(f"plugin {plugin_name!r} failed to import module {module!r}: {type(e).__name__}: {e}") from e


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_components(modules: Iterable[str] = (), autoload: bool | None = None) -> Components:
    """Load the built-ins, entry-point plugins and ``modules``, then collect their registrations.

    Args:
        modules: dotted module names (the config's ``plugins:`` list).
        autoload: load the ``anymodal`` entry-point group; default: unless the environment variable
            ``ANYMODAL_DISABLE_PLUGIN_AUTOLOAD`` is set.

    Raises:
        PluginError: a plugin failed to import, broke the hook contract, or registered a name twice.
    """
    pm = _new_manager()
    comps = Components(manager=pm)
    _register(pm, _import(BUILTIN, "builtin"), "builtin")
    comps.plugins["builtin"] = "built in"
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        for ep in _entry_points():
            try:
                plugin = ep.load()
            except Exception as e:  # report which entry point broke, keep the cause
                raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r} of "
                                  f"{ep.dist.name if ep.dist else 'unknown package'}) failed to load: "
                                  f"{type(e).__name__}: {e}") from e
            _register(pm, plugin, ep.name)
            version = ep.dist.version if ep.dist else "?"
            comps.plugins[ep.name] = f"entry point {ep.value} ({ep.dist.name if ep.dist else '?'} {version})"
    for module in modules:
        _register(pm, _import(module, module), module)
        comps.plugins[module] = f"config module {module}"
    for hook_name, kind in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            try:
                found = impl.function()
            except Exception as e:  # name the plugin whose hook raised
                raise PluginError(f"plugin {impl.plugin_name!r}: hook {hook_name} raised {type(e).__name__}: {e}") from e
            if found is None:
                continue
            if not isinstance(found, Mapping):
                raise PluginError(f"plugin {impl.plugin_name!r}: hook {hook_name} returned {type(found).__name__} "
                                  f"({found!r:.80}), expected a mapping of name to factory")
            for name, factory in found.items():
                try:
                    comps.registries[kind].add(name, factory, impl.plugin_name)
                except (TypeError, ValueError) as e:
                    raise PluginError(str(e)) from e
    return comps
