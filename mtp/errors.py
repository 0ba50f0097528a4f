"""User-facing errors.

Anything wrong with what the user gave us (a missing corpus, a malformed config, a corrupt
checkpoint, an impossible option combination) raises :class:`MTPError`. The CLI turns it into one
line on stderr and exit code 2, with no traceback. Programming errors stay ordinary exceptions.
"""


class MTPError(Exception):
    """Bad input from the user: the message is shown as is, on one line."""
