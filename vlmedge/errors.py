"""The exception types the CLI turns into a one-line error and an exit code."""


class VlmedgeError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting. The message is one line."""

    exit_code = 1


class Interrupted(VlmedgeError):
    """Ctrl-C, after whatever could be kept was kept (a checkpoint, the finished steps): exit 130 as shells expect."""

    exit_code = 130
