"""The images a task shows the model: files picked by its media policy, video frames as PNG, images by MIME type."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bernini.media import sample_preview_frames
from bernini.prompt_enhancer.templates import MediaPolicy

FRAMES_PER_VIDEO = 3


@dataclass(frozen=True)
class _MediaPlan:
    """The files a task shows to the model: frames of `videos` first, then `images`."""

    videos: tuple[Path, ...] = ()
    frames_per_video: int = FRAMES_PER_VIDEO
    images: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.videos + self.images


def _plan_media(
    policy: MediaPolicy, videos: Sequence[Path], image: Path | None, images: Sequence[Path]
) -> _MediaPlan:
    """Pick, per the task's policy, which of the caller's files are sent."""
    video_paths = tuple(Path(v) for v in videos)
    image_paths = tuple(Path(p) for p in ([image] if image is not None else []) + list(images))
    if policy is MediaPolicy.NONE:
        return _MediaPlan()
    if policy is MediaPolicy.VIDEO_FRAMES:
        return _MediaPlan(videos=video_paths)
    if policy is MediaPolicy.IMAGES:
        return _MediaPlan(images=image_paths)
    if policy is MediaPolicy.VIDEO_FRAMES_THEN_IMAGES:
        return _MediaPlan(videos=video_paths, images=image_paths)
    if image_paths or not video_paths:  # IMAGES_OR_FIRST_FRAME
        return _MediaPlan(images=image_paths)
    return _MediaPlan(videos=video_paths[:1], frames_per_video=1)


def _read_video_frames(path: Path, count: int) -> list[bytes]:
    """`count` evenly spread, upright frames of a video (first/middle/last for 3), PNG-encoded."""
    # bernini.media owns frame picking and the PyAV differences between versions (media/container.py).
    return [_png_bytes(frame) for frame in sample_preview_frames(path, count)]


def _png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sniff_mime(data: bytes) -> str | None:
    """The image MIME type from magic bytes, or None for formats the API does not take."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _image_payload(path: Path) -> tuple[str, bytes]:
    """(MIME type, bytes) of an image file, judged by content; other formats become PNG."""
    data = path.read_bytes()
    mime = _sniff_mime(data)
    if mime is not None:
        return mime, data
    try:
        with Image.open(io.BytesIO(data)) as img:
            return "image/png", _png_bytes(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image") from None


def _load_media(plan: _MediaPlan) -> list[tuple[str, bytes]]:
    """(MIME type, bytes) of every image to send, in order."""
    frames = [
        ("image/png", frame) for video in plan.videos for frame in _read_video_frames(video, plan.frames_per_video)
    ]
    return frames + [_image_payload(path) for path in plan.images]
