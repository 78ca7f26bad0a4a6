"""Errors a user can act on.

Everything raised as an ``EdgevitError`` is printed by the CLI as one line (no traceback) and
ends the process with its ``exit_code``, so the message must say what was wrong and what to do.
The codes tell a script what happened: 2 usage or bad input, 3 verification failed (nothing was
written), 4 a runtime or backend this needs is missing here.
"""

EXIT_USAGE, EXIT_VERIFICATION_FAILED, EXIT_MISSING_BACKEND = 2, 3, 4
EXIT_CODES_HELP = ("Exit codes: 0 done; 2 usage or bad input; 3 verification failed (nothing was written); "
                   "4 a runtime or backend is missing here.")


class EdgevitError(Exception):
    """A problem with the user's input or environment, not a bug in edgevit."""

    exit_code = EXIT_USAGE


class MissingBackend(EdgevitError):
    """A package or runtime the command needs is not installed, or cannot run on this machine."""

    exit_code = EXIT_MISSING_BACKEND


class UnknownModelError(EdgevitError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return self.args[0] if self.args else ""


class CheckpointError(EdgevitError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""
