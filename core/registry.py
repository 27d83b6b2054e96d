"""Registries of named components, filled only through the plugin hooks."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from .errors import UserError

__all__ = ["Registry", "RegistryEntry", "UnknownNameError", "DuplicateNameError", "ArgumentError", "closest",
           "nested_components"]


class UnknownNameError(KeyError):
    """A component name that no plugin registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class DuplicateNameError(ValueError):
    """Two plugins registered the same name for the same kind of component."""


class ArgumentError(UserError, ValueError):
    """A component factory's argument outside its valid values. It names the argument, so that
    `core.config.validate` can name the config key (``modality.masker.ratio``) and its file.

    Args:
        argument: the factory's keyword argument.
        value: the value it was given.
        problem: what is wrong, phrased to follow the name ("must be in [0, 1)").
    """

    def __init__(self, argument: str, value: Any, problem: str) -> None:
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument} {problem}, got {value!r}")


def closest(name: str, choices: list[str] | Mapping[str, Any], n: int = 3) -> list[str]:
    """The valid names nearest to ``name`` (by difflib's ratio), best first."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def nested_components(factory: Callable[..., Any]) -> dict[str, str]:
    """The component nodes nested in a component's config section that its ``factory`` declares in a
    ``components`` attribute: dotted key in the section -> registry kind (``{"text.tokenizer":
    "tokenizer"}``). `core.build` builds them from their registries and passes the modules in their
    place; `core.config.validate` checks them."""
    return dict(getattr(factory, "components", None) or {})


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    factory: Callable[..., Any]
    plugin: str


class Registry:
    """Name -> factory for one kind of component (tokenizer, masker, objective, ...).

    Args:
        kind: what the registry holds, used in error messages ("tokenizer").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}

    def add(self, name: str, factory: Callable[..., Any], plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"plugin {plugin!r} registered a {self.kind} with name {name!r}; names are non-empty strings")
        if not callable(factory):
            raise TypeError(f"plugin {plugin!r} registered {self.kind} {name!r} as {factory!r}, which is not callable")
        if name in self._entries:
            other = self._entries[name].plugin
            raise DuplicateNameError(f"{self.kind} {name!r} is registered by both plugin {other!r} and plugin {plugin!r}")
        self._entries[name] = RegistryEntry(name, factory, plugin)

    def entry(self, name: str) -> RegistryEntry:
        if name not in self._entries:
            valid = sorted(self._entries)
            near = closest(name, valid)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; registered {self.kind}s: {', '.join(valid) or '(none)'}")
        return self._entries[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Build component ``name`` with ``kwargs`` checked against its factory's signature."""
        entry = self.entry(name)
        check_kwargs(entry.factory, kwargs, f"{self.kind} {name!r}")
        return entry.factory(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


def check_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Raise TypeError naming every unknown or missing argument, with the closest valid names."""
    errors = signature_errors(factory, kwargs)
    if errors:
        raise TypeError(f"{what}: " + "; ".join(errors))


def signature_errors(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> list[str]:
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = None
    else:
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    errors = []
    if accepted is not None:
        for key in kwargs:
            if key not in accepted:
                near = closest(key, accepted)
                hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
                errors.append(f"unknown argument {key!r}{hint}; valid: {', '.join(accepted)}")
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs:
            errors.append(f"missing required argument {n!r}")
    return errors
