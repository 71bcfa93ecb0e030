"""The one user-facing error type of rcic.

Library code raises ``RcicError`` (or a subclass) for anything a user can fix: a missing file,
a misspelt column, a bad recipe value. ``rcic.cli`` catches it once, prints its message as one
line on stderr and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class RcicError(Exception):
    """An error caused by the user's input; its message is one line that names what is wrong."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        # a URL (s3://bucket/x) stays as it is: Path would fold its "//"
        self.path = None if path is None else (str(path) if "://" in str(path) else Path(path))
        text = " ".join(str(message).split())  # always one line
        super().__init__(f"{self.path}: {text}" if self.path is not None else text)


class DataError(RcicError):
    """The data (CSV, images, store, logits) is missing or malformed."""


class RecipeError(RcicError):
    """A training recipe or an override is invalid."""
