"""Objectives: one module per family, registered by name in `anymodal.plugins.components`."""
