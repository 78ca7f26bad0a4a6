"""Errors a user can act on.

Everything raised as an ``EdgevitError`` is printed by the CLI as one line (no traceback) and
ends the process with a non-zero exit code, so the message must say what was wrong and what to do.
"""


class EdgevitError(Exception):
    """A problem with the user's input or environment, not a bug in edgevit."""


class UnknownModelError(EdgevitError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return self.args[0] if self.args else ""


class CheckpointError(EdgevitError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""
