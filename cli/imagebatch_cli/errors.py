"""Exit codes, the contract with scripts, and the one exception commands raise to use them.

| code | meaning |
|---|---|
| 0 | done: the batch succeeded, or the command did what it was asked |
| 1 | the batch failed, or the CSV is invalid (nothing was created) |
| 2 | usage: a wrong argument, or a request that does not fit the batch's state |
| 3 | not found, or the cluster or the object store refused or could not be reached |
| 4 | gave up waiting (``--timeout``) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    INTERRUPTED = 130


class CliError(Exception):
    """Ends the command with ``code`` after printing ``message`` on stderr."""

    def __init__(self, code: ExitCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
