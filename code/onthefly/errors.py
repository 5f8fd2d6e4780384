"""One exception type for problems the user can fix (bad option, missing file, ...).

Entry points catch it, print its message on one line and exit with status 2, so a user
never sees a traceback for a mistake in their own input.
"""


class UserError(Exception):
    """An error in the user's input; the message names the option or file at fault."""
