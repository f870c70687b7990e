"""Errors the apps report as one line ("error: …") instead of a traceback. No imports: the apps' argument parsing
stays fast."""


class UsageError(ValueError):
    """A flag, file or input the user can fix (exit status 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the reason (exit status 1)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes
    of a library's many-line one."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
