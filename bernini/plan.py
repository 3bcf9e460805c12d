"""Case + settings -> the effective render: mode, size, frames, tokens, forwards and the passes of each step."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from bernini import media, outputs
from bernini.cases import Case, CaseError, resolve_mode
from bernini.conditioning import Conditions, Source, SourceIdRule, visual_sources
from bernini.config import GenerationSettings, RendererConfig
from bernini.guidance import GUIDANCE_MODES, get_mode
from bernini.presets import get_preset
from bernini.sampling import Step, preview_steps

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
    """Upright (width, height) of an image that fully decodes; MediaError otherwise."""
    file = media.check_local_file(path, "image")  # URL, missing, empty and oversized files first
    return media.open_rgb_image(file).size


@dataclass(frozen=True)
class MediaPlan:
    path: str
    kind: str  # video | image
    frames: int
    width: int
    height: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class PassRun:
    """Consecutive steps (1-based, inclusive) that run one expert with the same ω and guidance passes."""

    steps: tuple[int, int]
    expert: str
    omega: tuple[float, float, float]  # vid, img, txt
    passes: tuple[str, ...]  # passes run, e.g. "VI·c"; empty: the step cannot move the latent and runs nothing


def pass_runs(steps: Sequence[Step]) -> tuple[PassRun, ...]:
    """Group a render's steps into runs of equal expert, ω and passes."""
    runs: list[PassRun] = []
    for step in steps:
        omega = (step.scales.vid, step.scales.img, step.scales.txt)
        passes = tuple(str(c) for c in step.passes)
        last = runs[-1] if runs else None
        if last is not None and (last.expert, last.omega, last.passes) == (step.expert, omega, passes):
            runs[-1] = PassRun((last.steps[0], step.index + 1), step.expert, omega, passes)
        else:
            runs.append(PassRun((step.index + 1, step.index + 1), step.expert, omega, passes))
    return tuple(runs)


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
    warnings: tuple[str, ...] = ()  # what renders other than the task's name suggests (dry run, sidecar, log)
    passes: tuple[PassRun, ...] = ()  # what each step runs, for the A14B renderer config (two experts, boundary 0.875)

    @property
    def cost(self) -> float:
        """Relative work (token-forwards x steps, attention-weighted) to balance data-parallel groups."""
        return float(sum(n + n * n / 20000 for n in self.tokens_per_forward) * self.steps)

    def to_dict(self) -> dict[str, Any]:
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


def plan_media(case: Case, settings: GenerationSettings) -> tuple[MediaPlan, ...]:
    """Probe every source (cached); a bad file is a CaseError naming the case file and the key."""
    keyed = [("video", "video", p) for p in case.videos]
    keyed += [("image", "image", case.image)] if case.image else []
    keyed += [("images", "image", p) for p in case.images]
    plans = []
    for key, kind, path in keyed:
        try:
            plans.append(_media_plan(path, kind, settings))
        except media.MediaError as exc:
            raise CaseError(f"{case.source}: key {key!r}: {exc}") from None
    return tuple(plans)


def effective_settings(case: Case, settings: GenerationSettings) -> GenerationSettings:
    """Image tasks render one frame, so their videos are read as one frame too: upstream with --num_frames 1."""
    return replace(settings, num_frames=1) if case.task.single_frame and settings.num_frames != 1 else settings


def plan_case(case: Case, settings: GenerationSettings) -> CasePlan:
    """Probe the media (cached) and resolve every effective value; raises CaseError on bad media."""
    task = case.task
    if not task.single_frame and media.coerce_num_frames(settings.num_frames) == 1:
        raise CaseError(
            f"{case.source}: --num_frames {settings.num_frames} gives 1 frame (counts become 4k+1 as upstream: n // 4 * 4 + 1), "
            f"but task {task.name!r} renders a video: use --num_frames 5 or more (nearest valid value: 5; 4 gives 5 too), "
            "or an image task (t2i, i2i, r2i) for one frame"
        )
    settings = effective_settings(case, settings)
    sources = plan_media(case, settings)
    # The target follows the first video, else the single image, else --height/--width (spec 2, 6.2).
    if case.videos:
        first = sources[0]
        frames, width, height = (1 if task.single_frame else first.frames), first.width, first.height
    elif case.image is not None:
        first = sources[0]
        frames, width, height = 1 if task.single_frame else media.coerce_num_frames(settings.num_frames), first.width, first.height
    else:
        frames = 1 if task.single_frame else media.coerce_num_frames(settings.num_frames)
        width, height = media.snap_to_16(settings.width), media.snap_to_16(settings.height)
        if (width, height) != (settings.width, settings.height):
            log.info("%s: size %dx%d snapped to multiples of 16: %dx%d", case.name, settings.width, settings.height, width, height)
    if settings.num_frames != frames and not task.single_frame and not case.videos:
        log.info("%s: num_frames %d coerced to 4k+1: %d", case.name, settings.num_frames, frames)
    mode_name = resolve_mode(case, settings.guidance_mode)
    if settings.preset is not None and case.task_type not in get_preset(settings.preset).tasks:
        raise CaseError(f"{case.source}: --preset {settings.preset} is published for {', '.join(get_preset(settings.preset).tasks)} only, not {case.task_type}; set the flags yourself")
    if not settings.use_unipc and get_mode(mode_name).uses_apg:
        # The Euler fallback ends at sigma 0, where APG's x0-space conversion divides by zero.
        raise CaseError(f"{case.source}: guidance mode {mode_name!r} needs the UniPC scheduler; drop --no-use_unipc or pick rv2v, v2v, v2v_chain or t2v")
    grid = latent_grid(frames, height, width)
    tokens = _tokens(grid)
    fake = _fake_conditions(case, sources)
    rule = SourceIdRule(settings.use_src_tgt_id, settings.interpolate_src_id, settings.max_trained_src_id)
    per_forward = tuple(tokens + sum(s.tokens for s, _ in visual_sources(fake, c.visual, rule)) for c in get_mode(mode_name).passes)
    warnings = media_warnings(case, mode_name, fake, rule)
    for warning in warnings:
        log.warning("%s: %s", case.source, warning)
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
        warnings=warnings,
        passes=pass_runs(preview_steps(settings, get_mode(mode_name), boundary=RendererConfig().switch_dit_boundary)),
    )


def media_warnings(case: Case, mode_name: str, cond: Conditions, rule: SourceIdRule) -> tuple[str, ...]:
    """The two ways a case renders other than its task suggests (both run, as upstream; both are said).

    The task expects media the case lacks (i2v without 'image' renders from text like t2v), or the
    guidance mode's passes never show the model some of the case's media (t2v_apg with a video).
    """
    warnings = []
    absent = case.task.absent_inputs(len(case.videos), case.image is not None, len(case.images))
    if absent:
        alike = (" like t2i" if case.task.single_frame else " like t2v") if not case.media() else ""
        have = _describe_media(len(case.videos), case.image is not None, len(case.images))
        warnings.append(
            f"task {case.task_type!r} expects {' and '.join(absent)}; it renders from {have}{alike}, "
            "as upstream does (the task only picks the system prompt)"
        )
    unused = _unseen(cond, mode_name, rule)
    if unused:
        n_video = len(cond.videos)
        keys = [f"video #{i + 1}" if n_video > 1 else "video" for i in range(n_video)] + (["image"] if cond.image is not None else [])
        keys += [f"images #{i + 1}" for i in range(len(cond.images))]
        names = [key for key, source in zip(keys, cond.all, strict=True) if id(source) in unused]
        sizing = cond.all[0] if cond.all else None  # the first video, else the image, sets the target's size
        note = ""
        if sizing is not None and id(sizing) in unused and (cond.videos or cond.image is not None):
            note = " (it still sets the output's size and frame count)" if cond.videos else " (it still sets the output's size)"
        users = [m for m in GUIDANCE_MODES if not _unseen(cond, m, rule)]
        passes = ", ".join(str(c) for c in get_mode(mode_name).passes)
        warnings.append(
            f"guidance mode {mode_name!r} ({passes}) never shows the model the case's {', '.join(names)}{note}; "
            f"modes that use all of its media: {', '.join(users)} (--guidance_mode or 'guidance_mode')"
        )
    return tuple(warnings)


def _unseen(cond: Conditions, mode_name: str, rule: SourceIdRule) -> set[int]:
    """ids of the condition sources that none of the mode's passes puts in the sequence."""
    seen = {id(s) for pass_ in get_mode(mode_name).passes for s, _ in visual_sources(cond, pass_.visual, rule)}
    return {id(s) for s in cond.all} - seen


def _describe_media(videos: int, image: bool, images: int) -> str:
    parts = [f"{videos} video(s)"] if videos else []
    parts += ["the image"] if image else []
    parts += [f"{images} reference image(s)"] if images else []
    return ("text and " + ", ".join(parts)) if parts else "text alone"


def _fake_conditions(case: Case, sources: tuple[MediaPlan, ...]) -> Conditions:
    """Token-count stand-ins for the encoded media (no VAE needed to count tokens)."""
    import torch

    made = [Source(torch.empty(0), m.grid) for m in sources]
    n_video = len(case.videos)
    image = made[n_video] if case.image is not None else None
    return Conditions(tuple(made[:n_video]), image, tuple(made[n_video + (image is not None) :]))


def format_plan(planned: Sequence[tuple[Case, CasePlan]], errors: Sequence[tuple[str, str]]) -> str:
    """The --dry-run table: per case task, mode, size, frames, fps, forwards per step, output."""
    lines = [f"{'case':24} {'task':6} {'mode':9} {'size':>9} {'frames':>6} {'fps':>5} {'fwd/step':>8} {'tokens':>8}  output"]
    for case, p in planned:
        lines.append(
            f"{case.name[:24]:24} {p.task_type:6} {p.guidance_mode:9} {p.width:>4}x{p.height:<4} {p.frames:>6} "
            f"{p.fps:>5g} {p.forwards_per_step:>8} {max(p.tokens_per_forward):>8}  {p.output}"
        )
        if p.passes:
            lines.append("    passes: " + " | ".join(format_run(run) for run in p.passes))
    lines += [f"WARNING {case.name}: {w}" for case, p in planned for w in p.warnings]
    lines += [f"INVALID {m if m.startswith(s) else f'{s}: {m}'}" for s, m in errors]
    lines.append(f"{len(planned)} case(s) ready, {len(errors)} invalid")
    return "\n".join(lines)


def format_run(run: PassRun) -> str:
    first, last = run.steps
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    omega = "/".join(f"{w:g}" for w in run.omega)
    return f"{steps} {run.expert} ω {omega}: {' '.join(run.passes) or 'nothing (dt 0)'}"


def plan_all(cases: Sequence[Case], settings: GenerationSettings, errors: list[tuple[str, str]]) -> list[tuple[Case, CasePlan]]:
    """Probe every case's media and check every output folder before any model loads."""
    planned = []
    for case in cases:
        try:
            plan = plan_case(case, settings)
            _check_writable(Path(plan.output), case)
            planned.append((case, plan))
            log.info("%s: output %s", case.name, plan.output)
        except ValueError as exc:  # CaseError, or a rule of media/plan
            message = str(exc)
            errors.append((case.source, message if message.startswith(case.source) else f"{case.source}: {message}"))
        except Exception as exc:  # a probe bug must not stop the other cases
            errors.append((case.source, f"{case.source}: cannot be planned ({type(exc).__name__}: {exc})"))
    return planned


def check_run_destinations(planned: Sequence[tuple[Case, CasePlan]], summary: Path, output_dir: Path, *, overwrite: bool = False) -> None:
    """--summary and --output_dir are usable and the summary replaces no file of the batch (ValueError otherwise)."""
    files = list(outputs.protected_files([case for case, _ in planned]))
    for _, plan in planned:
        files += [Path(plan.output), outputs.sidecar_path(Path(plan.output))]
    outputs.check_destinations(summary, output_dir, files, overwrite=overwrite)


def _check_writable(output: Path, case: Case) -> None:
    folder = output.parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CaseError(f"{case.source}: key 'output': folder {folder} cannot be created or written; choose another --output_dir")
    if output.is_dir():
        raise CaseError(f"{case.source}: key 'output': {output} is a folder; name a file")
