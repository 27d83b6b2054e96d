"""The error types a user's input can cause: the command line prints each as one line, exit status 2.

Anything else that escapes a command is a bug and keeps its traceback. A component (dataset,
tokenizer, plugin) raises one of these, or a subclass, for a problem with what the user gave it:
a file, a config value, a field the batch lacks.
"""

from __future__ import annotations

import ast
import re

__all__ = ["UserError", "DataError", "CorruptFileError"]


class UserError(Exception):
    """A problem with the user's input (config, files, command line), told in one line."""


class DataError(UserError, ValueError):
    """A data file or sample that cannot be used: the message names the file or field and why."""


# the message CorruptFileError builds, read back when the error is rebuilt from it alone
_CORRUPT_MESSAGE = re.compile(r"corrupt or unreadable file ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): (.*)")


class CorruptFileError(DataError):
    """A data file that cannot be read, or whose content is not valid (truncated, out of range).

    It survives pickling and torch's DataLoader, which re-raises an error from a worker process
    as ``type(error)(message)`` with the worker's traceback in the message: given one argument,
    the error reads the path and reason back from the last message of its own kind in it, so the
    command line still prints one line naming the file.

    Args:
        path: The offending file, or (alone) a message holding this error's own message.
        reason: What is wrong with it.

    Attributes:
        path: The offending file.
        reason: What is wrong (for a decoder's error: its type and message).
    """

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:
            path, reason = _path_and_reason(str(path))
        super().__init__(f"corrupt or unreadable file {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.reason)


def _path_and_reason(message: str) -> tuple[str, str]:
    """The path and reason in the last CorruptFileError message within ``message`` (a worker's traceback)."""
    found = [m for m in map(_CORRUPT_MESSAGE.search, message.splitlines()) if m]
    if not found:
        return "?", message.strip()
    return ast.literal_eval(found[-1].group(1)), found[-1].group(2)
