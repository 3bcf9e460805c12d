"""WeightsError, and what keeps its messages short: a few examples, the first line of a cause."""

from __future__ import annotations

MAX_EXAMPLES = 5


class WeightsError(ValueError):
    """A checkpoint cannot be found or loaded; the message names the path, the problem and the fix."""


class CheckpointError(WeightsError):
    """The checkpoint's files are there but unusable (corrupt, pickled, wrong keys, shapes, dtypes or config)."""


def first_line(error: BaseException) -> str:
    """First line of an exception message, to keep WeightsError messages short."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
