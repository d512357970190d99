"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class VlmedgeError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting. The message is one line."""
