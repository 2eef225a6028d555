"""Typed errors. A `KinoUserError` is the user's to fix: the CLI prints its message and
exits 2 with no traceback. Anything else escaping the CLI is an internal failure (exit 1)."""


class KinoUserError(Exception):
    """Bad input from the user: the message says what is wrong and what is allowed."""


class VideoReadError(KinoUserError):
    """A file could not be read as video or image: corrupt, truncated, empty or not media."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path!s}: {reason}")


class CaptionError(KinoUserError):
    """A caption that does not follow the Shapes World grammar."""
