"""Check that media paths are local files within limits, and probe a video's size, rotation, fps and frames."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from bernini.media.container import open_input
from bernini.media.errors import MediaError, av, require_av

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

logger = logging.getLogger(__package__)  # "bernini.media" in every module, as log lines always read

# Input limits: beyond these a render would exhaust memory or time long before it helps anyone.
MAX_FILE_BYTES = 4 * 1024**3
MAX_PIXELS = 4096 * 4096
MAX_FRAMES = 10_000

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class VideoInfo:
    """What probe_video learned about a video file.

    width/height are the display size (after rotation); rotation is the clockwise turn in degrees
    (0, 90, 180 or 270) that makes the stored frames upright, like the classic `rotate` tag.
    """

    path: Path
    width: int
    height: int
    fps: float
    frames: int
    rotation: int
    duration: float


def check_local_file(path: PathLike, kind: str) -> Path:
    """Refuse URLs, missing paths, folders and empty or oversized files before any decoding."""
    text = os.fspath(path)
    if _URL_RE.match(text):
        raise MediaError(
            f"{kind} '{text}' is a URL; URLs are not accepted; download the file first "
            "and pass its local path"
        )
    file = Path(text).expanduser()
    if not file.exists():
        raise MediaError(
            f"{kind} '{file}' does not exist; check the path (relative paths start at {Path.cwd()})"
        )
    if not file.is_file():
        raise MediaError(f"{kind} '{file}' is not a regular file; pass the path of a file")
    size = file.stat().st_size
    if size == 0:
        raise MediaError(f"{kind} '{file}' is empty (0 bytes); re-export or re-download it")
    if size > MAX_FILE_BYTES:
        raise MediaError(
            f"{kind} '{file}' is {size / 1024**3:.1f} GiB, over the "
            f"{MAX_FILE_BYTES / 1024**3:g} GiB file size limit; trim or re-encode it smaller, e.g. "
            f"`ffmpeg -i {file.name} -t 10 -vf scale=1280:-2 -c:v libx264 -crf 18 small.mp4`"
        )
    return file


def probe_video(path: PathLike) -> VideoInfo:
    """Check a video is local, decodable and within limits; return its display size, fps, frames."""
    file = check_local_file(path, "video")
    with open_container(file) as container:
        stream = pick_video_stream(container, file)
        if stream.codec_context is not None:  # refuse huge frames before decoding one
            check_pixel_limit(file, stream.codec_context.width, stream.codec_context.height)
        first = decode_first_frame(container, stream, file)
        check_pixel_limit(file, first.width, first.height)
        rotation = read_rotation(first, stream, file)
        fps = read_fps(stream)
        declared = int(stream.frames or 0)
        duration = read_duration(container, stream)
    if declared > MAX_FRAMES:
        raise_frame_limit(file, declared)
    frames = declared if declared > 0 else count_frames(file)
    if frames == 0:
        raise MediaError(
            f"video '{file}' has no decodable frames; re-encode it, e.g. "
            f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
        )
    if fps is None:
        if duration <= 0:
            raise MediaError(
                f"video '{file}' has no frame rate or duration; re-encode it with a fixed rate, "
                f"e.g. `ffmpeg -i {file.name} -r 30 -c:v libx264 fixed.mp4`"
            )
        fps = frames / duration
    if duration <= 0:
        duration = frames / fps
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    info = VideoInfo(file, width, height, fps, frames, rotation, duration)
    logger.debug("probed %s", info)
    return info


def open_container(file: Path) -> InputContainer:
    """Open a file with PyAV, turning demuxer failures into MediaError."""
    require_av()
    try:
        return open_input(file)
    except av.error.FFmpegError as exc:
        raise MediaError(
            f"video '{file}' could not be decoded ({exc}); check it is a video file "
            f"(mp4/mov/mkv/webm) or re-encode it, e.g. "
            f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
        ) from exc


def pick_video_stream(container: InputContainer, file: Path) -> VideoStream:
    """The first real video stream (cover art in audio files does not count)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"
            return stream
    raise MediaError(
        f"video '{file}' has no video stream (audio-only or cover art only); pass a file with "
        f"video, or re-mux one that has it, e.g. `ffmpeg -i {file.name} -map 0:v -c copy video.mp4`"
    )


def check_pixel_limit(file: Path, width: int, height: int) -> None:
    """Refuse frames larger than MAX_PIXELS."""
    if width * height > MAX_PIXELS:
        raise MediaError(
            f"video '{file}' is {width}x{height}, over the pixels-per-frame limit of {MAX_PIXELS} "
            f"(4096x4096 by default); downscale it first, e.g. "
            f"`ffmpeg -i {file.name} -vf scale=1920:-2 -c:v libx264 -crf 18 smaller.mp4`"
        )


def raise_frame_limit(file: Path, frames: int) -> NoReturn:
    """Refuse videos longer than MAX_FRAMES frames."""
    raise MediaError(
        f"video '{file}' has at least {frames} frames, over the {MAX_FRAMES}-frame limit; "
        f"trim it first (the renderer reads only the first seconds anyway), e.g. "
        f"`ffmpeg -i {file.name} -t 20 -c:v libx264 -crf 18 trimmed.mp4`"
    )


def decode_first_frame(container: InputContainer, stream: VideoStream, file: Path) -> av.VideoFrame:
    """Decode one frame, which proves the stream is decodable and carries the display matrix."""
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        raise MediaError(
            f"video '{file}' could not be decoded ({exc}); re-encode it, e.g. "
            f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
        ) from exc
    raise MediaError(
        f"video '{file}' has zero frames; re-export the clip, or re-encode it, e.g. "
        f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
    )


def read_rotation(frame: av.VideoFrame, stream: VideoStream, file: Path) -> int:
    """Clockwise degrees to display upright, from the display matrix or the legacy `rotate` tag."""
    # PyAV reports the display matrix counter-clockwise; the legacy tag is clockwise.
    clockwise = -float(frame.rotation)
    if clockwise == 0:
        tag = stream.metadata.get("rotate")
        if tag:
            try:
                clockwise = float(tag)
            except ValueError:
                logger.warning("video '%s': ignoring unreadable rotate tag %r", file, tag)
    quarter_turns = round(clockwise / 90.0)
    if abs(clockwise - quarter_turns * 90) > 1.0:
        logger.warning(
            "video '%s': rotation %.1f is not a multiple of 90 degrees; using %d",
            file, clockwise, quarter_turns * 90 % 360,
        )
    snapped = quarter_turns * 90 % 360
    return snapped


def read_fps(stream: VideoStream) -> float | None:
    """Average frame rate of the stream, or None when the container does not say."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def read_duration(container: InputContainer, stream: VideoStream) -> float:
    """Duration in seconds from the stream, else the container; 0.0 when unknown."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def count_frames(file: Path) -> int:
    """Count frames by decoding, for containers that do not store a count (e.g. mkv, webm)."""
    count = 0
    with open_container(file) as container:
        stream = pick_video_stream(container, file)
        try:
            for _ in container.decode(stream):
                count += 1
                if count > MAX_FRAMES:
                    raise_frame_limit(file, count)
        except av.error.FFmpegError as exc:
            raise damaged_error(file, count, exc) from exc
    return count


def damaged_error(file: Path, index: int, exc: Exception) -> MediaError:
    """The error for a stream that stops decoding part-way."""
    return MediaError(
        f"video '{file}' is damaged at frame {index} ({exc}); re-encode it, e.g. "
        f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
    )
