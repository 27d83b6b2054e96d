"""The error types a user's input can cause: the command line prints each as one line, exit status 2.

Anything else that escapes a command is a bug and keeps its traceback. A component (dataset,
tokenizer, plugin) raises one of these, or a subclass, for a problem with what the user gave it:
a file, a config value, a field the batch lacks.
"""

from __future__ import annotations

__all__ = ["UserError", "DataError"]


class UserError(Exception):
    """A problem with the user's input (config, files, command line), told in one line."""


class DataError(UserError, ValueError):
    """A data file or sample that cannot be used: the message names the file or field and why."""
