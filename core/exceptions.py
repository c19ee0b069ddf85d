"""Errors that reach the user as one clear message, without a traceback."""


class UserError(Exception):
    """Bad input or environment (a flag, a file, a missing model): print the message, exit 2."""


class DataError(UserError):
    """A dataset record is malformed. The message names the file or config, the row and the field."""
