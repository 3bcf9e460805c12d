"""Write rendered frames atomically (one as PNG, more as H.264 mp4) and verify that they read back."""

from __future__ import annotations

import logging
import math
import os
from contextlib import suppress
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from bernini.media.container import open_input
from bernini.media.errors import MediaError, av, require_av

logger = logging.getLogger(__package__)  # "bernini.media" in every module, as log lines always read

# x264 quality of written videos, as the official renderer writes them (near-invisible loss).
OUTPUT_CRF = 8
# Keeps the mp4 time base small for float fps such as 29.97 (-> 2997/100).
_FPS_MAX_DENOMINATOR = 1001


def write_media(frames: np.ndarray, path: Path, fps: float) -> Path:
    """Write [T, H, W, 3] frames (floats in [0, 1] or uint8) atomically: one as PNG, more as mp4.

    The file appears under `path` only once it was written in full and read back correctly.
    """
    path = Path(path)
    pixels = quantize_frames(frames, path)
    count, height, width = pixels.shape[:3]
    check_output_path(path, count, width, height, fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        if count == 1:
            Image.fromarray(pixels[0]).save(tmp, format="PNG")
        else:
            encode_mp4(pixels, tmp, fps)
        sync_file(tmp)
        if not verify_media(tmp, count, width, height):
            raise MediaError(
                f"output '{path}': the written file did not read back as {count} frames of "
                f"{width}x{height}; check the disk and the PyAV/FFmpeg install, then rerun"
            )
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):  # cleanup must not mask the real error
            tmp.unlink(missing_ok=True)
        if isinstance(exc, MediaError) or not isinstance(exc, Exception):
            raise  # already explained, or an interrupt that must propagate unchanged
        raise MediaError(
            f"output '{path}' could not be written ({type(exc).__name__}: {exc}); check the folder "
            "is writable and has free space, then rerun (nothing was left under that name)"
        ) from exc
    logger.info("wrote %s (%d frames, %dx%d)", path, count, width, height)
    return path


def quantize_frames(frames: np.ndarray, path: Path) -> np.ndarray:
    """[T, H, W, 3] uint8 from uint8 input or floats in [0, 1] (round(clip(x, 0, 1) * 255))."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise MediaError(
            f"output '{path}': frames must be [T, H, W, 3] with T >= 1, got shape {array.shape}; "
            "convert [C, T, H, W] model output with .permute(1, 2, 3, 0)"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise MediaError(
            f"output '{path}': frames contain NaN or infinite values, so the render diverged; "
            "rerun with another seed or precision instead of saving a broken file"
        )
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def check_output_path(path: Path, count: int, width: int, height: int, fps: float) -> None:
    """Validate the suffix against the frame count, and the size and fps for H.264."""
    suffix = path.suffix.lower()
    if count == 1:
        if suffix != ".png":
            raise MediaError(
                f"output '{path}': one-frame outputs are written as PNG; "
                "the path should end in .png"
            )
        return
    if suffix != ".mp4":
        raise MediaError(
            f"output '{path}': {count}-frame outputs are written as H.264 mp4; "
            "the path should end in .mp4"
        )
    if width % 2 or height % 2:
        raise MediaError(
            f"output '{path}': {width}x{height} has an odd side, which H.264 yuv420p cannot store; "
            "resize the frames to even sizes (the renderer's sizes are multiples of 16)"
        )
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError(
            f"output '{path}': fps must be a positive number, got {fps}; pass the render fps (e.g. 16)"
        )


def make_video_frame(rgb: np.ndarray) -> av.VideoFrame:
    """Wrap one RGB uint8 frame for the encoder (a seam for tests)."""
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def encode_mp4(pixels: np.ndarray, file: Path, fps: float) -> None:
    """Encode uint8 [T, H, W, 3] frames to H.264 (libx264, yuv420p, crf 8) at `fps`."""
    require_av()
    rate = Fraction(fps).limit_denominator(_FPS_MAX_DENOMINATOR)
    with av.open(str(file), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(OUTPUT_CRF)})
        stream.width = pixels.shape[2]
        stream.height = pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        for rgb in pixels:
            container.mux(stream.encode(make_video_frame(rgb)))
        container.mux(stream.encode(None))  # flush delayed frames


def sync_file(file: Path) -> None:
    """fsync so a power cut after os.replace cannot leave an empty file under the final name."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_media(path: Path, frames: int, width: int, height: int) -> bool:
    """True only if the file opens and holds exactly `frames` frames of width x height."""
    file = Path(path)
    try:
        if not file.is_file() or file.stat().st_size == 0:
            return False
        if file.suffix.lower() == ".png":
            with Image.open(file) as image:
                image.load()  # decode fully so a truncated PNG fails here
                return frames == 1 and image.size == (width, height)
        return verify_video(file, frames, width, height)
    except (OSError, ValueError, SyntaxError, av.error.FFmpegError) as exc:
        logger.debug("verify_media: '%s' does not read back: %s", file, exc)
        return False


def verify_video(file: Path, frames: int, width: int, height: int) -> bool:
    """Decode every frame and check the count and size (stored count alone misses truncation)."""
    with open_input(file) as container:
        if not container.streams.video:
            return False
        stream = container.streams.video[0]
        count = 0
        for frame in container.decode(stream):
            if (frame.width, frame.height) != (width, height):
                return False
            count += 1
            if count > frames:
                return False
        return count == frames
