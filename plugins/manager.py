"""Load plugins (built-ins, the ``anymodal`` entry-point group, config-named modules) and collect
their components into registries."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pluggy

from .. import __version__
from ..core.errors import UserError
from ..core.registry import Registry
from . import hookspecs
from .contract import tokenizer_problems

__all__ = ["Components", "PluginError", "load_components", "ENTRY_POINT_GROUP", "KINDS"]

ENTRY_POINT_GROUP = "anymodal"
DISABLE_AUTOLOAD_ENV = "ANYMODAL_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN = "anymodal.plugins.builtin.components"
BUILTIN_NAME = "builtin"
# hook name -> registry kind
KINDS = {
    "register_tokenizers": "tokenizer",
    "register_datasets": "dataset",
    "register_transforms": "transform",
    "register_maskers": "masker",
    "register_objectives": "objective",
    "register_teachers": "teacher",
}


class PluginError(UserError, RuntimeError):
    """A plugin failed to import, to register, or returned something the contract does not allow."""


@dataclass
class Components:
    """Every registered component, one registry per kind, and where each plugin came from."""

    registries: dict[str, Registry] = field(default_factory=lambda: {k: Registry(k) for k in KINDS.values()})
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> where it came from
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> "<distribution> <version>"
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> why it was skipped (skip_broken)
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


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> bool:
    """Register ``plugin``; False when it (or its name) already is."""
    if pm.has_plugin(name) or pm.is_registered(plugin):
        return False
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} does not match the hook contract: {e}") from e
    required = getattr(plugin, "ANYMODAL_API", hookspecs.API_VERSION)
    if required != hookspecs.API_VERSION:
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} targets plugin API version {required}, this anymodal provides "
                          f"{hookspecs.API_VERSION} (see anymodal.plugins.hookspecs)")
    return True


def _import(module: str, plugin_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # any import-time failure is the plugin's; report it with its name
        raise PluginError(f"plugin {plugin_name!r} failed to import module {module!r}: {type(e).__name__}: {e}") from e


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as e:  # report which entry point broke, keep the cause
        raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r} of "
                          f"{ep.dist.name if ep.dist else 'unknown package'}) failed to load: "
                          f"{type(e).__name__}: {e}") from e


def _registrations(pm: pluggy.PluginManager, name: str) -> dict[str, Registry]:
    """One plugin's components, kind -> registry of its own (names and factories checked)."""
    own = {kind: Registry(kind) for kind in KINDS.values()}
    for hook_name, kind in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                found = impl.function()
            except Exception as e:  # name the plugin whose hook raised
                raise PluginError(f"plugin {name!r}: hook {hook_name} raised {type(e).__name__}: {e}") from e
            if found is None:
                continue
            if not isinstance(found, Mapping):
                raise PluginError(f"plugin {name!r}: hook {hook_name} returned {type(found).__name__} "
                                  f"({found!r:.80}), expected a mapping of name to factory")
            for component, factory in found.items():
                try:
                    own[kind].add(component, factory, name)
                except (TypeError, ValueError) as e:
                    raise PluginError(str(e)) from e
    return own


def _check_tokenizers(own: dict[str, Registry], name: str) -> None:
    if name == BUILTIN_NAME:  # the built-in tokenizers have their own registry-wide tests
        return
    for entry in own["tokenizer"]:
        problems = tokenizer_problems(entry.factory)
        if problems:
            raise PluginError(f"plugin {name!r}: tokenizer {entry.name!r} breaks the tokenizer contract "
                              f"(anymodal.plugins.hookspecs.register_tokenizers), checked on load: " + "; ".join(problems))


def _add_plugin(comps: Components, name: str, load: Callable[[], Any], origin: str, version: str) -> None:
    """Load, register, check and add one plugin's components; on failure nothing of it stays."""
    assert comps.manager is not None
    pm = comps.manager
    if not _register(pm, load(), name):
        return
    try:
        own = _registrations(pm, name)
        for kind, registry in own.items():
            clash = [entry.name for entry in registry if entry.name in comps.registries[kind]]
            if clash:
                other = comps.registries[kind].entry(clash[0]).plugin
                raise PluginError(f"{kind} {clash[0]!r} is registered by both plugin {other!r} and plugin {name!r}")
        _check_tokenizers(own, name)
    except PluginError:
        pm.unregister(name=name)
        raise
    for kind, registry in own.items():
        for entry in registry:
            comps.registries[kind].add(entry.name, entry.factory, name)
    comps.plugins[name], comps.versions[name] = origin, version


def load_components(modules: Iterable[str] = (), autoload: bool | None = None, skip_broken: bool = False) -> Components:
    """Load the built-ins, entry-point plugins and ``modules``, then collect their registrations.

    Args:
        modules: dotted module names (the config's ``plugins:`` list).
        autoload: load the ``anymodal`` entry-point group; default: unless the environment variable
            ``ANYMODAL_DISABLE_PLUGIN_AUTOLOAD`` is set.
        skip_broken: an entry-point plugin that fails is left out and recorded in
            ``Components.failed`` (plugin name -> the error) instead of raising (``anymodal doctor``).

    Raises:
        PluginError: a plugin failed to import, broke the hook contract, registered a name twice,
            or registered a tokenizer that fails its contract check.
    """
    pm = _new_manager()
    comps = Components(manager=pm)
    _add_plugin(comps, BUILTIN_NAME, lambda: _import(BUILTIN, BUILTIN_NAME), f"built in (anymodal {__version__})", f"anymodal {__version__}")
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    for ep in _entry_points() if autoload else ():
        dist = ep.dist.name if ep.dist else "?"
        version = f"{dist} {ep.dist.version if ep.dist else '?'}"
        try:
            _add_plugin(comps, ep.name, lambda: _load_entry_point(ep), f"entry point {ep.value} ({version})", version)
        except PluginError as e:
            if not skip_broken:
                raise PluginError(f"{e} [installed package {dist}: fix or uninstall it, or set {DISABLE_AUTOLOAD_ENV}=1 "
                                  f"to load no entry-point plugins; `anymodal doctor` lists every broken one]") from e
            comps.failed[ep.name] = str(e)
    for module in modules:
        _add_plugin(comps, module, lambda: _import(module, module), f"config module {module}",
                    f"module {module}, no version")
    return comps
