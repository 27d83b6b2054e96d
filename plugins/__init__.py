"""Plugin contract (hookspecs) and the plugin manager."""

from .hookspecs import API_VERSION, hookimpl, hookspec
from .manager import Components, PluginError, load_components

__all__ = ["API_VERSION", "hookimpl", "hookspec", "Components", "PluginError", "load_components"]
