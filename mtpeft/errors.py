"""The one exception type users see (no heavy imports: the CLI's --help path imports this alone)."""


class MtpeftError(Exception):
    """A user-facing error: the message names the problem and the fix."""
