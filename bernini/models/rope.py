"""3D RoPE per source grid with the Bernini source-id phase, as float32 cos/sin tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims for (t, h, w): Wan splits 128 as 44/42/42."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)


def rope_angles(grid: tuple[int, int, int], head_dim: int, source_id: float = 0.0) -> torch.Tensor:
    """Rotation angles [T*H*W, head_dim/2] (float64) for one source grid, positions from 0.

    Each pair's angle is its (t, h, w) position angle plus `source_id` times the pair's 1D
    frequency over the whole head dim: the official complex product freqs * exp(i*sid*f).
    """
    t, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    parts = [
        torch.outer(torch.arange(n, dtype=torch.float64), _inv_freq(d))
        for n, d in ((t, dt), (h, dh), (w, dw))
    ]
    angles = torch.cat(
        [
            parts[0][:, None, None, :].expand(t, h, w, -1),
            parts[1][None, :, None, :].expand(t, h, w, -1),
            parts[2][None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim // 2)
    if source_id:
        angles = angles + source_id * _inv_freq(head_dim)
    return angles


def rope_tables(
    grids: Sequence[tuple[int, int, int]], source_ids: Sequence[float], head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L_total, head_dim/2] float32 for the packed sequence of several sources."""
    angles = torch.cat([rope_angles(g, head_dim, s) for g, s in zip(grids, source_ids, strict=True)])
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by cos/sin [L, D/2]; computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2).type_as(x)


def source_ids(count: int, *, enabled: bool = True, interpolate: bool = True, max_trained: int = 5) -> list[float]:
    """Source ids of `count` condition sources: 1..n, spread evenly over [1, max_trained] beyond it."""
    if not enabled:
        return [0.0] * count
    if interpolate and count > max_trained:
        return torch.linspace(1, max_trained, count, dtype=torch.float64).tolist()
    return [float(i + 1) for i in range(count)]
