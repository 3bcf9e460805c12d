"""The official renderer's size and frame rules: sides fitted and snapped to 16, 4k+1 frames, fps resampling."""

from __future__ import annotations

import math

import numpy as np


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


def snap_to_16(side: int, scale: float = 1.0) -> int:
    """Scale one side and round it to a multiple of 16 (Python round: half to even), at least 16.

    The one snap rule: source media sides (via resize_dims) and the --width/--height of text-only tasks.
    """
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
