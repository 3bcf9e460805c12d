"""Open media files with PyAV the same way on every PyAV we support (14.1 to 19.x)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bernini.media.errors import av, require_av

if TYPE_CHECKING:
    from av.container import InputContainer


def open_input(file: str | Path) -> InputContainer:
    """av.open(file) for reading, with container and stream metadata that is not UTF-8 never fatal.

    PyAV before 19 decodes metadata strictly unless told ``metadata_errors="replace"`` (a phone clip
    with a Latin-1 title would fail to open); PyAV 19 dropped that argument (``TypeError``) and
    always decodes leniently. Which one is installed is learned from av.open itself, not from its
    version string, so a backport or a fork behaves by what it does.
    """
    require_av()
    try:
        return av.open(str(file), mode="r", metadata_errors="replace")
    except TypeError as exc:
        if "metadata_errors" not in str(exc):
            raise
    return av.open(str(file), mode="r")
