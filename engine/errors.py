"""Errors that the CLI reports as one line and exit code 2."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input from the user (flag, path, file); the message names the problem and the fix."""
