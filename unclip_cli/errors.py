"""Exceptions the engine raises; the CLI turns each into one line `Error: ...` plus a hint."""


class UnclipError(Exception):
    """A problem the user can fix. `hint` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class WeightsError(UnclipError):
    """A model set or checkpoint file is missing, truncated, corrupted or mismatched."""


class InputError(UnclipError):
    """A user-supplied image, mask, prompt or option is unusable."""


class DataError(UnclipError):
    """A corpus could not be built or read."""


class UsageError(InputError):
    """A mistake in the command line itself (an option's value out of range, an argument missing): the CLI exits 2,
    as for the mistakes its parser finds, where a problem with a file or the model exits 1."""
