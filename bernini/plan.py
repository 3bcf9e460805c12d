"""Case + settings -> the effective render: mode, size, frames, tokens and forwards per step."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from bernini import media
from bernini.cases import Case, CaseError, resolve_mode
from bernini.conditioning import Conditions, Source, SourceIdRule, visual_sources
from bernini.config import GenerationSettings
from bernini.guidance import get_mode

log = logging.getLogger(__name__)

VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid of a pixel clip: VAE stride (4, 8, 8), then the (1, 2, 2) patch."""
    t = (frames - 1) // VAE_STRIDE[0] + 1
    return t // PATCH[0], height // VAE_STRIDE[1] // PATCH[1], width // VAE_STRIDE[2] // PATCH[2]


def _tokens(grid: tuple[int, int, int]) -> int:
    return grid[0] * grid[1] * grid[2]


@lru_cache(maxsize=512)
def _probe(path: Path, mtime: float) -> media.VideoInfo:
    return media.probe_video(path)


def probe(path: Path) -> media.VideoInfo:
    return _probe(path, path.stat().st_mtime)


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            from PIL import ImageOps

            return ImageOps.exif_transpose(img).size
    except Exception as exc:
        raise media.MediaError(f"image {str(path)!r} cannot be decoded ({exc}); re-save it as PNG or JPEG") from None


@dataclass(frozen=True)
class MediaPlan:
    path: str
    kind: str  # video | image
    frames: int
    width: int
    height: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class CasePlan:
    """What a case will actually render; shown by --dry-run and written to the sidecar."""

    name: str
    task_type: str
    guidance_mode: str
    frames: int
    width: int
    height: int
    fps: float
    grid: tuple[int, int, int]
    output: str
    sources: tuple[MediaPlan, ...]
    forwards_per_step: int
    tokens_per_forward: tuple[int, ...]
    steps: int

    @property
    def cost(self) -> float:
        """Relative work (token-forwards x steps, attention-weighted) to balance data-parallel groups."""
        return float(sum(n + n * n / 20000 for n in self.tokens_per_forward) * self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


def _media_plan(path: Path, kind: str, settings: GenerationSettings) -> MediaPlan:
    if kind == "video":
        info = probe(path)
        frames = len(media.sample_frame_indices(info.frames, info.fps, settings.fps, settings.num_frames))
        w, h = media.resize_dims(info.width, info.height, settings.max_image_size)
    else:
        frames = 1
        w, h = media.resize_dims(*image_size(path), settings.max_image_size)
    return MediaPlan(str(path), kind, frames, w, h, latent_grid(frames, h, w))


def snap16(side: int) -> int:
    return max(16, round(side / 16) * 16)


def plan_case(case: Case, settings: GenerationSettings) -> CasePlan:
    """Probe the media (cached) and resolve every effective value; raises CaseError on bad media."""
    try:
        sources = tuple(
            [_media_plan(p, "video", settings) for p in case.videos]
            + [_media_plan(p, "image", settings) for p in ([case.image] if case.image else []) + list(case.images)]
        )
    except media.MediaError as exc:
        raise CaseError(f"{case.source}: {exc}") from None
    task = case.task
    if case.videos:
        first = sources[0]
        frames, width, height = (1 if task.single_frame else first.frames), first.width, first.height
    elif case.image is not None:
        first = sources[0]
        frames, width, height = 1 if task.single_frame else media.coerce_num_frames(settings.num_frames), first.width, first.height
    else:
        frames = 1 if task.single_frame else media.coerce_num_frames(settings.num_frames)
        width, height = snap16(settings.width), snap16(settings.height)
        if (width, height) != (settings.width, settings.height):
            log.info("%s: size %dx%d snapped to multiples of 16: %dx%d", case.name, settings.width, settings.height, width, height)
    if settings.num_frames != frames and not task.single_frame and not case.videos:
        log.info("%s: num_frames %d coerced to 4k+1: %d", case.name, settings.num_frames, frames)
    mode_name = resolve_mode(case, settings.guidance_mode)
    grid = latent_grid(frames, height, width)
    tokens = _tokens(grid)
    fake = _fake_conditions(case, sources)
    rule = SourceIdRule(settings.use_src_tgt_id, settings.interpolate_src_id, settings.max_trained_src_id)
    per_forward = tuple(tokens + sum(s.tokens for s, _ in visual_sources(fake, c.visual, rule)) for c in get_mode(mode_name).combos)
    return CasePlan(
        name=case.name,
        task_type=case.task_type,
        guidance_mode=mode_name,
        frames=frames,
        width=width,
        height=height,
        fps=settings.fps,
        grid=grid,
        output=str(case.output),
        sources=sources,
        forwards_per_step=len(per_forward),
        tokens_per_forward=per_forward,
        steps=settings.num_inference_steps,
    )


def _fake_conditions(case: Case, sources: tuple[MediaPlan, ...]) -> Conditions:
    """Token-count stand-ins for the encoded media (no VAE needed to count tokens)."""
    import torch

    made = [Source(torch.empty(0), m.grid) for m in sources]
    n_video = len(case.videos)
    image = made[n_video] if case.image is not None else None
    return Conditions(tuple(made[:n_video]), image, tuple(made[n_video + (image is not None) :]))
