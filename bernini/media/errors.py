"""The error for unusable media, and PyAV where it is installed (only video input/output needs it)."""

from __future__ import annotations

try:
    import av
except ImportError:  # sizing rules and images still work; video I/O explains what to install
    av = None


def require_av() -> None:
    if av is None:
        raise MediaError("video input/output needs PyAV: pip install av")


class MediaError(ValueError):
    """A media file cannot be used; the message names the file, the problem and the fix."""
