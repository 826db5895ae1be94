"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit 2."""


class UserError(ValueError):
    """Bad input, a missing or corrupted file, or an unavailable backend, with the fix."""
