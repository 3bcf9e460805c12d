"""The images a task shows the model: files picked by its media policy, video frames as PNG, images by MIME type."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

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


def _frame_indices(total: int, count: int) -> list[int]:
    """Evenly spread indices from the first to the last frame (first/middle/last for 3)."""
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
    return container.streams.video[0]


def _count_frames(path: Path) -> int:
    """Frames in the first video stream, decoding when the container does not say."""
    import av  # heavy import, only needed for video tasks

    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        if stream.frames > 0:
            return stream.frames
        return sum(1 for _ in container.decode(stream))


def _read_video_frames(path: Path, count: int) -> list[bytes]:
    """`count` evenly spread frames of a video, PNG-encoded."""
    import av  # heavy import, only needed for video tasks

    total = _count_frames(path)
    if total < 1:
        raise ValueError(f"{path}: video has no frames")
    wanted = _frame_indices(total, count)
    picked: dict[int, bytes] = {}
    with av.open(str(path)) as container:
        frame = None
        for index, frame in enumerate(container.decode(_video_stream(container, path))):
            if index in wanted:
                picked[index] = _encode_frame(frame)
            if index >= wanted[-1]:
                break
        if frame is None:
            raise ValueError(f"{path}: could not decode any frame")
        # Container frame counts can overstate; the real last frame stands in for indices past it.
        tail = picked.get(wanted[-1]) or _encode_frame(frame)
    return [picked.get(i, tail) for i in wanted]


def _encode_frame(frame: Any) -> bytes:
    """A decoded PyAV frame as upright PNG bytes."""
    return _png_bytes(_upright(frame.to_image(), frame.rotation))


def _upright(image: Image.Image, rotation_ccw: float) -> Image.Image:
    """Undo the display-matrix rotation (PyAV reports degrees counter-clockwise) of a frame."""
    # Phone videos are often stored sideways; the model should see them the way players show them.
    quarter_turns = round(rotation_ccw / 90) % 4
    if quarter_turns == 0:
        return image
    turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return image.transpose(turns[quarter_turns - 1])


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
