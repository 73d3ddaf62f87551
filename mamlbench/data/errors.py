"""The one exception class of the data layer.

`DataError` is a `ValueError`, so the CLI prints its one-line message and exits with code 2
instead of a traceback: every bad input (missing mirror file, checksum mismatch, unreadable PNG,
N-way larger than a split) is the user's to fix, not a bug.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data; the message is one line that names the file or key."""
