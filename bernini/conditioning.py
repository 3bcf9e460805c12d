"""Condition sources -> packed sequence layouts: which latents precede the target, with which source ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bernini.models import rope_tables, source_ids


@dataclass(frozen=True)
class Source:
    """One VAE-encoded condition (or the target): packed patches [1, L, pt*ph*pw*C] on a token grid."""

    packed: torch.Tensor
    grid: tuple[int, int, int]

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass(frozen=True)
class Conditions:
    """A case's encoded media, in the official order: videos, then the image, then reference images."""

    videos: tuple[Source, ...] = ()
    image: Source | None = None
    images: tuple[Source, ...] = ()

    @property
    def references(self) -> tuple[Source, ...]:
        return ((self.image,) if self.image is not None else ()) + self.images

    @property
    def all(self) -> tuple[Source, ...]:
        return self.videos + self.references


@dataclass(frozen=True)
class SourceIdRule:
    """--use_src_tgt_id, --interpolate_src_id and --max_trained_src_id."""

    enabled: bool = True
    interpolate: bool = True
    max_trained: int = 5

    def ids(self, count: int) -> list[float]:
        return source_ids(count, enabled=self.enabled, interpolate=self.interpolate, max_trained=self.max_trained)


def visual_sources(cond: Conditions, visual: str, rule: SourceIdRule) -> tuple[tuple[Source, float], ...]:
    """The (source, source id) pairs a pass's visual part puts before the target.

    none: target only. V: the first video, with its id from the VI numbering. I: the image and
    reference images, numbered on their own. VI: everything, numbered 1..n. A part the case
    lacks is simply empty (so e.g. rv2v on t2v degenerates to text guidance, as upstream).
    """
    if visual == "none":
        return ()
    if visual == "V":
        return tuple(zip(cond.videos[:1], rule.ids(len(cond.all))[:1]))
    if visual == "I":
        return tuple(zip(cond.references, rule.ids(len(cond.references)), strict=True))
    if visual == "VI":
        return tuple(zip(cond.all, rule.ids(len(cond.all)), strict=True))
    raise ValueError(f"unknown visual pass part {visual!r}; expected none, V, I or VI")


@dataclass(frozen=True)
class Layout:
    """One distinct packed sequence [conditions..., target]: what the transformer sees for a pass."""

    conditions: tuple[tuple[Source, float], ...]
    cos: torch.Tensor  # [L_total, head_dim/2]
    sin: torch.Tensor
    target_tokens: int

    @property
    def condition_tokens(self) -> int:
        return sum(s.tokens for s, _ in self.conditions)

    @property
    def total_tokens(self) -> int:
        return self.condition_tokens + self.target_tokens

    def condition_patches(self) -> torch.Tensor | None:
        """All condition patches [1, L_cond, F] in sequence order, or None for target-only."""
        if not self.conditions:
            return None
        return torch.cat([s.packed for s, _ in self.conditions], dim=1)


def build_layout(
    sources: tuple[tuple[Source, float], ...], target_grid: tuple[int, int, int], head_dim: int, device: torch.device | str
) -> Layout:
    grids = [s.grid for s, _ in sources] + [target_grid]
    ids = [sid for _, sid in sources] + [0.0]  # the target is source 0: plain Wan RoPE
    cos, sin = rope_tables(grids, ids, head_dim, device)
    tokens = target_grid[0] * target_grid[1] * target_grid[2]
    return Layout(sources, cos, sin, tokens)


def layout_key(sources: tuple[tuple[Source, float], ...]) -> tuple:
    """Passes whose sequences are identical share one key (e.g. V and none when there is no video)."""
    return tuple((id(s.packed), sid) for s, sid in sources)
