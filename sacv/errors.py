"""Errors in what the user gave: a config, a name, a folder or file, a run directory in use.

Their message says what to fix. The ``sacv`` commands print it as one line (``error: ...``) and a
flow run ends Failed with it as its state message, without a traceback; every other exception is an
internal error and keeps its traceback. Each class also derives from the builtin that callers catch.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user fixes (module docstring)."""


class InputError(UserError, ValueError):
    """A config value, a name (model, layer, class, concept) or a folder that does not fit."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or run directory that does not exist."""


class NotYetRun(UserError, RuntimeError):
    """A stage needs what an earlier stage writes (the message names the stage to run)."""
