"""One exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line (no traceback) and exits with
status 2; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input the user can correct; the message says what to do."""


class Interrupted(Exception):
    """Training stopped on a signal after saving its state; the message says how to resume (exit status 130)."""
