"""Errors that are the user's to fix: printed as one line, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (flag, file, path). The CLI prints ``error: <message>`` and exits.

    ``exit_code`` is 2 for invalid flags/config values (argparse's convention) and 1 for everything else.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UserError):
    """An invalid flag or configuration value (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
