"""Plugin contract (hookspecs), the plugin manager, and the built-in plugins: one folder per modality
(image, video, lidar, audio, text) and `components` (maskers, objectives, teachers), each an entry
point of the ``anymodal`` group like an outside sensor package."""

from .hookspecs import API_VERSION, hookimpl, hookspec
from .manager import Components, PluginError, load_components

__all__ = ["API_VERSION", "hookimpl", "hookspec", "Components", "PluginError", "load_components"]
