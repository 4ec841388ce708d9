"""User-facing errors.

A `UserError` is bad input the user can fix (a missing path, a mismatched checkpoint, an invalid option). The CLI
prints its message as one line and exits with status 2, before any heavy work starts and without touching existing
outputs. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, reported as one line and a non-zero exit."""
