"""Objectives: one module per family, each registered by name through the built-in plugin."""
