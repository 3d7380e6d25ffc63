"""The example's own error: a one-line message saying what went wrong and how to fix it."""

from __future__ import annotations


class ExampleError(Exception):
    """A problem the example's CLI reports as one line and a non-zero exit status."""
