"""Load source images and videos into model tensors and write rendered frames atomically."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import av
except ImportError:  # sizing rules and images still work; video I/O explains what to install
    av = None

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

# Input limits: beyond these a render would exhaust memory or time long before it helps anyone.
MAX_FILE_BYTES = 4 * 1024**3
MAX_PIXELS = 4096 * 4096
MAX_FRAMES = 10_000

# x264 quality of written videos, as the official renderer writes them (near-invisible loss).
OUTPUT_CRF = 8
# Keeps the mp4 time base small for float fps such as 29.97 (-> 2997/100).
_FPS_MAX_DENOMINATOR = 1001

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")

PathLike = str | os.PathLike[str]


def require_av() -> None:
    if av is None:
        raise MediaError("video input/output needs PyAV: pip install av")


class MediaError(ValueError):
    """A media file cannot be used; the message names the file, the problem and the fix."""


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


# ---------------------------------------------------------------------------------------------
# Size and frame rules (exactly the official renderer's)
# ---------------------------------------------------------------------------------------------


def resize_dims(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Target (width, height): downscale to fit max_size, snap each side to a multiple of 16."""
    if width <= 0 or height <= 0 or max_size <= 0:
        raise ValueError(f"resize_dims needs positive sizes, got {width}x{height} max {max_size}")
    scale = min(max_size / max(width, height), 1.0)
    new_w, new_h = snap_to_16(width, scale), snap_to_16(height, scale)
    if max(new_w, new_h) > max_size:
        # Rounding up can overshoot the limit; the official rule rescales exactly once.
        scale2 = max_size / max(new_w, new_h)
        new_w, new_h = snap_to_16(new_w, scale2), snap_to_16(new_h, scale2)
    return new_w, new_h


def snap_to_16(side: int, scale: float) -> int:
    """Scale one side and round it to a multiple of 16 (Python round: half to even), at least 16."""
    return max(16, round(side * scale / 16) * 16)


def coerce_num_frames(n: int) -> int:
    """Snap a frame count to the 4k+1 form the VAE needs (80 -> 81, 1 -> 1)."""
    return n // 4 * 4 + 1


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float, num_frames: int
) -> list[int]:
    """Source frame indices to read: resample to `fps`, then keep the first 4k+1 <= num_frames."""
    if total_frames <= 0 or video_fps <= 0 or fps <= 0 or num_frames <= 0:
        raise ValueError(
            "sample_frame_indices needs positive values, got "
            f"total_frames={total_frames} video_fps={video_fps} fps={fps} num_frames={num_frames}"
        )
    if video_fps == fps:
        n = math.floor(total_frames / 4) * 4 + 1
    else:
        n = math.floor((total_frames / video_fps * fps) / 4) * 4 + 1
    n = max(n, 5)
    idx = [int(i) for i in np.round(np.linspace(0, total_frames - 1, n))]
    idx = [min(i, total_frames - 1) for i in idx]
    return idx[: coerce_num_frames(num_frames)]


# ---------------------------------------------------------------------------------------------
# Path checks shared by every reader
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def load_image(path: PathLike, max_size: int) -> torch.Tensor:
    """Image as a [3, 1, H, W] float32 tensor in [-1, 1], upright and resized by resize_dims."""
    file = check_local_file(path, "image")
    image = open_rgb_image(file)
    width, height = resize_dims(image.width, image.height, max_size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BICUBIC)  # PIL's bicubic is antialiased
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    tensor = pixels.permute(2, 0, 1).float() / 255.0
    return ((tensor - 0.5) / 0.5).unsqueeze(1)


def open_rgb_image(file: Path) -> Image.Image:
    """Open an image with PIL, apply its EXIF orientation and convert it to RGB."""
    try:
        with Image.open(file) as raw:
            upright = ImageOps.exif_transpose(raw)
            return upright.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise MediaError(
            f"image '{file}' is too large to decode safely ({exc}); downscale it first, e.g. "
            f"`ffmpeg -i {file.name} -vf scale=4096:-2 smaller.png`"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MediaError(
            f"image '{file}' could not be decoded ({exc}); check it is a PNG/JPEG/WebP image "
            f"or re-save it, e.g. `ffmpeg -i {file.name} fixed.png`"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------


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
        return av.open(str(file), mode="r", metadata_errors="replace")
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


def iter_decoded_frames(file: Path, rotation: int) -> Iterator[np.ndarray]:
    """Yield upright RGB uint8 [H, W, 3] frames in decode order; close it to stop decoding."""
    with open_container(file) as container:
        stream = pick_video_stream(container, file)
        index = 0
        try:
            for frame in container.decode(stream):
                yield rotate_upright(frame.to_ndarray(format="rgb24"), rotation)
                index += 1
        except av.error.FFmpegError as exc:
            raise damaged_error(file, index, exc) from exc


def damaged_error(file: Path, index: int, exc: Exception) -> MediaError:
    """The error for a stream that stops decoding part-way."""
    return MediaError(
        f"video '{file}' is damaged at frame {index} ({exc}); re-encode it, e.g. "
        f"`ffmpeg -i {file.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`"
    )


def rotate_upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored frame clockwise by `rotation` degrees so it displays upright."""
    if rotation == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))


def decode_selected(info: VideoInfo, indices: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode up to the largest wanted index; return the wanted frames and how many were decoded.

    Frames past the end of the stream (a container that over-reports its count) are absent.
    """
    wanted = set(indices)
    last = max(wanted)
    picked: dict[int, np.ndarray] = {}
    decoded = 0
    with closing(iter_decoded_frames(info.path, info.rotation)) as frames:
        for index, rgb in enumerate(frames):
            decoded = index + 1
            if index in wanted:
                picked[index] = rgb
            if index >= last:
                break  # only decode as far as needed
    return picked, decoded


def load_video(path: PathLike, fps: float, num_frames: int, max_size: int) -> torch.Tensor:
    """Video as a [3, T, H, W] float32 tensor in [-1, 1]: upright, resampled to fps, resized."""
    info = probe_video(path)
    indices = sample_frame_indices(info.frames, info.fps, fps, num_frames)
    picked, decoded = decode_selected(info, indices)
    if len(picked) < len(set(indices)):
        # The container over-reported its frames and we decoded them all: resample on the truth.
        if decoded == 0:
            raise MediaError(f"video '{info.path}' has zero decodable frames; re-encode it")
        logger.warning(
            "video '%s' declares %d frames but decodes %d; sampling from the decoded ones",
            info.path, info.frames, decoded,
        )
        info = dataclasses.replace(info, frames=decoded)
        indices = sample_frame_indices(decoded, info.fps, fps, num_frames)
        picked, _ = decode_selected(info, indices)
    width, height = resize_dims(info.width, info.height, max_size)
    resized = {i: resize_frame(rgb, width, height) for i, rgb in picked.items()}
    video = torch.stack([resized[i] for i in indices], dim=1).float() / 255.0
    return (video - 0.5) / 0.5


def resize_frame(rgb: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Resize an RGB uint8 frame to [3, H, W] uint8-valued floats, as torchvision does on uint8."""
    frame = torch.from_numpy(rgb).permute(2, 0, 1).float()
    if frame.shape[1:] == (height, width):
        return frame
    out = F.interpolate(
        frame.unsqueeze(0),
        size=(height, width),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return out.squeeze(0).round().clamp(0, 255)


def read_video_frames_rgb(path: PathLike, indices: Sequence[int]) -> list[Image.Image]:
    """The upright frames at `indices` (in that order) as PIL RGB images."""
    info = probe_video(path)
    if not indices:
        return []
    bad = [i for i in indices if i < 0 or i >= info.frames]
    if bad:
        raise MediaError(
            f"video '{info.path}' has {info.frames} frames; indices {bad} are out of range; "
            f"pass indices from 0 to {info.frames - 1}"
        )
    picked, _ = decode_selected(info, indices)
    if not picked:
        raise MediaError(f"video '{info.path}' has zero decodable frames; re-encode it")
    last = max(picked)
    missing = sorted({i for i in indices if i not in picked})
    if missing:
        logger.warning(
            "video '%s' ends at frame %d, before %s; using its last frame instead",
            info.path, last, missing,
        )
    return [Image.fromarray(picked.get(i, picked[last])) for i in indices]


def sample_preview_frames(path: PathLike, k: int = 3) -> list[Image.Image]:
    """k evenly spaced frames, first to last (k=3: first, middle, last), for the prompt enhancer."""
    if k <= 0:
        raise ValueError(f"sample_preview_frames needs k >= 1, got {k}")
    info = probe_video(path)
    if k == 1:
        return read_video_frames_rgb(info.path, [0])
    indices = [round(i * (info.frames - 1) / (k - 1)) for i in range(k)]
    return read_video_frames_rgb(info.path, indices)


# ---------------------------------------------------------------------------------------------
# Writing outputs
# ---------------------------------------------------------------------------------------------


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
    with av.open(str(file), mode="r", metadata_errors="replace") as container:
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
