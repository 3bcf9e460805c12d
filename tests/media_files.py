"""Small media files for tests: gray clips (optionally rotated), audio-only files."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest


def gray_frames(count: int, width: int, height: int, step: int = 6) -> np.ndarray:
    """Frame i is flat gray i*step, so a decoded frame tells which source frame it was."""
    values = (np.arange(count) * step % 256).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (count, height, width, 3)).copy()


def encode_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 30,
    container_format: str = "mp4",
    display_matrix: Sequence[int] | None = None,
    rotation: float | None = None,
) -> Path:
    """Write uint8 [T, H, W, 3] frames with x264 (near lossless) and optional display rotation."""
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if (display_matrix is not None or rotation is not None) and not hasattr(stream, "set_display_matrix"):
            # Reading a display matrix works from PyAV 14.1 on; writing one came in PyAV 18.
            pytest.skip(f"writing a display matrix needs PyAV >= 18 (this is {av.__version__})")
        if display_matrix is not None:
            stream.set_display_matrix(list(display_matrix))
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def encode_audio_only(path: Path) -> Path:
    """A short silent AAC track in an mp4 container, with no video stream."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            silence = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def small_clip(path: Path, rotation: float | None = None, frames: int = 9, width: int = 64, height: int = 32, step: int = 20) -> Path:
    """A short 16 fps gray clip stored landscape; `rotation` sets the display matrix (PyAV, counter-clockwise)."""
    return encode_video(path, gray_frames(frames, width, height, step), fps=16, rotation=rotation)
