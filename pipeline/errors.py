"""Errors the apps report as one line ("error: …") instead of a traceback. No imports: the apps' argument parsing
stays fast."""


class UsageError(ValueError):
    """A flag, file or input the user can fix (exit status 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the reason (exit status 1)."""
