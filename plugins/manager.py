"""Load plugins (the ``anymodal`` entry-point group, config-named modules) and collect their
components into registries.

The built-in plugins (each modality, and the modality-free components) are the entry points of the
``anymodal`` distribution itself: loaded first and always, whatever ``ANYMODAL_DISABLE_PLUGIN_AUTOLOAD``
says about other packages'."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import pluggy

from .. import __version__
from ..core.errors import UserError
from ..core.registry import Registry, closest
from . import hookspecs
from .contract import check_tokenizer, describe_failure, factory_problems, plugin_home, raised_at

__all__ = ["Components", "PluginError", "load_components", "component_failure", "plugin_entry_points",
           "ENTRY_POINT_GROUP", "KINDS", "HOOKS"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anymodal"
DISABLE_AUTOLOAD_ENV = "ANYMODAL_DISABLE_PLUGIN_AUTOLOAD"
DISTRIBUTION = "anymodal"
# hook name -> registry kind
KINDS = {
    "register_tokenizers": "tokenizer",
    "register_datasets": "dataset",
    "register_transforms": "transform",
    "register_maskers": "masker",
    "register_objectives": "objective",
    "register_teachers": "teacher",
}
HOOKS = tuple(sorted(n for n, f in vars(hookspecs).items() if hasattr(f, f"{hookspecs.PROJECT}_spec")))
UNMARKED_HOOK_LIKENESS = 0.85  # an unmarked function this close to a hook's name is a missed hook


class PluginError(UserError, RuntimeError):
    """A plugin failed to import, to register, or returned something the contract does not allow."""


@dataclass
class Components:
    """Every registered component, one registry per kind, and where each plugin came from."""

    registries: dict[str, Registry] = field(default_factory=lambda: {k: Registry(k) for k in KINDS.values()})
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> where it came from
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> "<distribution> <version>"
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> why it was skipped (skip_broken)
    builtin: set[str] = field(default_factory=set)  # the plugins anymodal ships: their failures are bugs
    manager: pluggy.PluginManager | None = None

    def __getattr__(self, kind: str) -> Registry:
        # components.tokenizer, components.masker, ...
        registries = self.__dict__.get("registries", {})
        if kind in registries:
            return registries[kind]
        raise AttributeError(kind)

    def blame(self, used: Iterable[tuple[str, str]], error: BaseException) -> Optional["PluginError"]:
        """The one-line error for ``error`` if it was raised in the code of one of ``used`` (kind, name)
        components from an outside plugin; None otherwise (a bug of ours keeps its traceback)."""
        return blame(self, used, error)

    def configure(self, config: Any) -> list[Mapping[str, Any]]:
        assert self.manager is not None
        results = []
        for impl in self.manager.hook.configure.get_hookimpls():
            try:
                out = impl.function(config=config)
            except Exception as e:  # an outside plugin's failure is its own: name it and the line
                if impl.plugin_name in self.builtin:
                    raise
                raise PluginError(f"plugin {impl.plugin_name!r}: hook configure raised "
                                  f"{describe_failure(e, _home(impl.plugin))}") from e
            if out is not None and not isinstance(out, Mapping):
                raise PluginError(f"plugin {impl.plugin_name!r}: hook configure returned {type(out).__name__}, expected a mapping or None")
            if out:
                results.append(out)
        return results


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _home(plugin: Any) -> tuple[str, ...]:
    """Where a plugin's code lives (see `plugin_home`)."""
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    return plugin_home(module)


def _defined_at(function: Any) -> str:
    code = getattr(function, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else repr(function)


def _did_you_mean(name: str) -> str:
    near = closest(name, HOOKS, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def _unmarked_hook(plugin: Any, attr: str, function: Any) -> bool:
    """A function of the plugin module itself named (nearly) as a hook, but not marked ``@hookimpl``."""
    if attr.startswith("_") or not (isinstance(plugin, types.ModuleType) and inspect.isfunction(function)
                                    and function.__module__ == plugin.__name__):
        return False
    # stricter than `closest`'s "did you mean" cutoff: helpers such as configure_logging are not hooks
    return attr in HOOKS or bool(difflib.get_close_matches(attr, HOOKS, n=1, cutoff=UNMARKED_HOOK_LIKENESS))


def _hook_name_problems(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hooks that are not anymodal's, and functions named as hooks that pluggy would skip (no marker)."""
    problems = []
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        function = getattr(plugin, attr)
        if opts is not None:
            hook = opts.get("specname") or attr
            if hook not in HOOKS and not opts.get("optionalhook"):
                problems.append(f"unknown hook {hook!r} ({_defined_at(function)}); {_did_you_mean(hook)}"
                                f"hooks: {', '.join(HOOKS)}")
        elif _unmarked_hook(plugin, attr, function):
            what = "a hook's name" if attr in HOOKS else f"a name near a hook's ({_did_you_mean(attr).strip()})"
            problems.append(f"function {attr!r} ({_defined_at(function)}) has {what} but no "
                            f"@anymodal.plugins.hookimpl, so anymodal would never call it")
    return problems


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> bool:
    """Register ``plugin``; False when it (or its name) already is."""
    if pm.has_plugin(name) or pm.is_registered(plugin):
        return False
    problems = _hook_name_problems(pm, plugin)
    if problems:
        raise PluginError(f"plugin {name!r} does not match the hook contract: " + "; ".join(problems))
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
    except Exception as e:  # any import-time failure is the plugin's; report it with its name and line
        where = describe_failure(e, plugin_home(module), fallback=False)
        raise PluginError(f"plugin {plugin_name!r} failed to import module {module!r}: {where}") from e


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as e:  # report which entry point broke, keep the cause
        raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r} of "
                          f"{ep.dist.name if ep.dist else 'unknown package'}) failed to load: "
                          f"{describe_failure(e, plugin_home(ep.module), fallback=False)}") from e


def _registrations(pm: pluggy.PluginManager, name: str) -> dict[str, Registry]:
    """One plugin's components, kind -> registry of its own (names and factories checked)."""
    own = {kind: Registry(kind) for kind in KINDS.values()}
    for hook_name, kind in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                found = impl.function()
            except Exception as e:  # name the plugin whose hook raised, and the line
                raise PluginError(f"plugin {name!r}: hook {hook_name} raised {describe_failure(e, _home(impl.plugin))}") from e
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


def _check_components(own: dict[str, Registry], name: str) -> None:
    """Every factory's signature, then every tokenizer on its example input; notes are logged."""
    for kind, registry in own.items():
        for entry in registry:
            problems = factory_problems(kind, entry.factory)
            if problems:
                raise PluginError(f"plugin {name!r}: {kind} {entry.name!r} " + "; ".join(problems))
    for entry in own["tokenizer"]:
        check = check_tokenizer(entry.factory)
        if check.problems:
            raise PluginError(f"plugin {name!r}: tokenizer {entry.name!r} breaks the tokenizer contract "
                              f"(anymodal.plugins.hookspecs.register_tokenizers), checked on load: " + "; ".join(check.problems))
        for note in check.notes:
            log.warning("plugin %r: tokenizer %r: %s (anymodal.plugins.hookspecs.register_tokenizers)", name, entry.name, note)


def component_failure(components: Components, kind: str, name: str, error: BaseException) -> Optional[PluginError]:
    """The error to raise when component ``name`` of ``kind`` raised ``error`` while it ran (a tokenizer on
    a training batch, a dataset reading a sample), ``from error``: one line naming the plugin, the
    component, the exception and the file:line in the plugin's code where it was raised. None for a
    component of the built-in plugin: its failures are bugs and keep their traceback.
    """
    entry = components.registries[kind].entry(name)
    if entry.plugin in components.builtin:
        return None
    home = plugin_home(getattr(entry.factory, "__module__", None) or "")
    return PluginError(f"plugin {entry.plugin!r}: {kind} {name!r} raised {describe_failure(error, home)}")


def blame(components: Components, used: Iterable[tuple[str, str]], error: BaseException) -> Optional[PluginError]:
    """`component_failure` for the first of ``used`` (kind, name) pairs from an outside plugin whose code
    ``error`` was raised in; None when it came from none of them (then it is a bug, with its traceback)."""
    for kind, name in used:
        entry = components.registries[kind].entry(name)
        home = plugin_home(getattr(entry.factory, "__module__", None) or "")
        if entry.plugin not in components.builtin and raised_at(error, home, fallback=False):
            return component_failure(components, kind, name, error)
    return None


def _add_plugin(comps: Components, name: str, load: Callable[[], Any], origin: str, version: str,
                builtin: bool = False) -> None:
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
        if not builtin:  # the built-in components have their own registry-wide tests
            _check_components(own, name)
    except PluginError:
        pm.unregister(name=name)
        raise
    for kind, registry in own.items():
        for entry in registry:
            comps.registries[kind].add(entry.name, entry.factory, name)
    comps.plugins[name], comps.versions[name] = origin, version
    if builtin:
        comps.builtin.add(name)


def _is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == DISTRIBUTION


def plugin_entry_points(autoload: bool | None = None) -> list[importlib.metadata.EntryPoint]:
    """The ``anymodal`` entry points to load, built-in ones first; other packages' only with ``autoload``
    (default: unless ``ANYMODAL_DISABLE_PLUGIN_AUTOLOAD`` is set).

    Raises:
        PluginError: anymodal's own entry points are missing (a clone used without being installed,
            or installed before a built-in plugin was added).
    """
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    found = list(_entry_points())
    builtin = [ep for ep in found if _is_builtin(ep)]
    if not builtin:
        raise PluginError(f"anymodal's built-in plugins are not registered (no {ENTRY_POINT_GROUP!r} entry points of "
                          f"the {DISTRIBUTION!r} distribution): install it, or reinstall a clone after pulling "
                          f"(pip install -e .)")
    return builtin + ([ep for ep in found if not _is_builtin(ep)] if autoload else [])


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
    for ep in plugin_entry_points(autoload):
        if _is_builtin(ep):
            _add_plugin(comps, ep.name, lambda: _import(ep.value, ep.name), f"built in (anymodal {__version__})",
                        f"anymodal {__version__}", builtin=True)
            continue
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
