"""The one error type for bad input found before (or instead of) training.

Every command catches :class:`InputError` and exits 2 with its message; anything else is a bug
and keeps its traceback. The subclasses only say where the problem was found.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "InputError",
    "MissingPathError",
    "ModelError",
    "TrainingError",
]


class InputError(ValueError):
    """Bad user input: an option, a file, a row, a model. The message names what is wrong."""


class ConfigError(InputError):
    """A bad option or configuration file (reported before anything is loaded)."""


class DataError(InputError):
    """A row that does not fit its format; the message names the file, line/row and field."""


class ModelError(InputError):
    """A model or tokenizer that cannot be loaded (the message names the flag and the path)."""


class MissingPathError(InputError, FileNotFoundError):
    """A path the user gave that does not exist."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why and what was kept."""
