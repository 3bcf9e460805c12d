"""Decode images and videos into upright, resized [3, T, H, W] tensors in [-1, 1], or frames as PIL images."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from bernini.media.errors import MediaError, av
from bernini.media.probe import (
    PathLike,
    VideoInfo,
    check_local_file,
    damaged_error,
    open_container,
    pick_video_stream,
    probe_video,
)
from bernini.media.rules import resize_dims, sample_frame_indices

logger = logging.getLogger(__package__)  # "bernini.media" in every module, as log lines always read


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
    """Open an image with PIL, apply its EXIF orientation and convert it to 8-bit RGB (see to_rgb)."""
    try:
        with Image.open(file) as raw:
            upright = ImageOps.exif_transpose(raw)
            return to_rgb(upright, file)
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


def to_rgb(image: Image.Image, file: Path) -> Image.Image:
    """8-bit RGB the way the official renderer's PIL convert("RGB") gives it, except where that clips.

    Pillow converts 8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr...) correctly: alpha is
    dropped, as upstream does. Its conversions of the wide modes treat every value above 255 as white,
    so a 16-bit gray PNG (mode I;16) decodes almost white. Those are scaled here instead:
    I;16*: v / 257 (65535 -> 255). I (32-bit): 0..255 as is (what Pillow's own convert("I") gives),
    else 0..65535 as 16-bit, else stretched from its min..max. F (float): 0..1 scaled by 255, else
    0..255 as is, else stretched; NaN or infinite pixels are refused.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise MediaError(f"image '{file}' has NaN or infinite pixel values; re-save it as an 8- or 16-bit PNG")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        gray = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        gray = values * 255.0
    elif low >= 0 and high <= 255:
        gray = values
    else:
        gray = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(gray).astype(np.uint8)).convert("RGB")


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
