"""User-facing errors: one line naming the file, key or rate that is wrong and what to do.

The CLI prints a UserError's message and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """Bad input or environment (not a bug)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file lacks a key, has an extra one, or holds a tensor of the wrong shape."""


class AudioError(UserError, ValueError):
    """An audio file is missing, unreadable, truncated or empty."""


class ProtocolError(Exception):
    """A client broke its protocol: told in one line, then closed (serve)."""
