"""Exceptions that the command line reports as one line with exit code 2."""


class UsageError(ValueError):
    """Invalid user input: the message names the value and the fix."""


class DatasetError(UsageError):
    """A dataset is missing, truncated or corrupt; the message names the file."""
