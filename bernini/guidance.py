"""Guidance modes that combine per-combo Bernini-R DiT velocity predictions into one velocity."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

VISUALS: tuple[str, ...] = ("none", "V", "I", "VI")
TEXTS: tuple[str, ...] = ("u", "c")

# Modes of the full Bernini planner; named here only to give a clear error.
PLANNER_ONLY_MODES: tuple[str, ...] = ("vae_txt_vit_wapg", "rv2v_wapg")

_NORMALIZE_EPS = 1e-12


class Combo(NamedTuple):
    """One conditioning combination: visual part in VISUALS and text embedding in TEXTS."""

    visual: str
    text: str

    def __str__(self) -> str:
        return f"{self.visual}·{self.text}"


NONE_U = Combo("none", "u")
NONE_C = Combo("none", "c")
V_U = Combo("V", "u")
I_U = Combo("I", "u")
I_C = Combo("I", "c")
VI_U = Combo("VI", "u")
VI_C = Combo("VI", "c")


@dataclass(frozen=True)
class GuidanceScales:
    """Omega values of one expert phase."""

    vid: float
    img: float
    txt: float

    def scaled(self, factor: float) -> GuidanceScales:
        """Return all three scales multiplied by `factor` (the omega_scale at the expert switch)."""
        return GuidanceScales(vid=self.vid * factor, img=self.img * factor, txt=self.txt * factor)


@dataclass(frozen=True)
class APGSettings:
    """Adaptive projected guidance settings; a threshold <= 0 disables norm clipping."""

    eta: float = 0.5
    norm_threshold: tuple[float, ...] = (50.0, 50.0, 50.0)
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if len(self.norm_threshold) == 0:
            raise ValueError("APGSettings.norm_threshold is empty; give at least one threshold")

    def threshold(self, index: int) -> float:
        """Threshold of guidance term `index`; the last given one is reused for later terms."""
        return float(self.norm_threshold[min(index, len(self.norm_threshold) - 1)])


@dataclass
class MomentumBuffer:
    """Running guidance difference of one APG term, carried across the steps of one case."""

    running: Tensor | None = None

    def update(self, diff: Tensor, momentum: float) -> Tensor:
        """Return diff + momentum * running and store it as the new running value."""
        if self.running is None:
            # The buffer starts at zero, so the first step is diff itself.
            running = diff
        elif self.running.shape != diff.shape:
            raise ValueError(
                f"momentum buffer shape {tuple(self.running.shape)} does not match guidance "
                f"difference shape {tuple(diff.shape)}; call GuidanceState.reset() between cases"
            )
        else:
            running = diff + momentum * self.running
        self.running = running
        return running


@dataclass
class GuidanceState:
    """Mutable per-case guidance state: one momentum buffer per APG term; reset per case."""

    mode: str
    buffers: dict[str, MomentumBuffer] = field(default_factory=dict)

    def buffer(self, term: str) -> MomentumBuffer:
        """Return the buffer of `term`, creating an empty one on first use."""
        return self.buffers.setdefault(term, MomentumBuffer())

    def reset(self) -> None:
        """Drop all momentum so the next step starts a fresh case."""
        self.buffers.clear()


@dataclass(frozen=True)
class StepContext:
    """Everything a combine function may need besides the per-combo values."""

    scales: GuidanceScales
    frames: int
    apg: APGSettings
    state: GuidanceState


# Receives float32 velocities (non-APG) or x0 estimates (APG) keyed by combo.
CombineFn = Callable[[Mapping[Combo, Tensor], StepContext], Tensor]


@dataclass(frozen=True)
class GuidanceMode:
    """A guidance mode: the combos it needs and how their predictions are combined."""

    name: str
    combos: tuple[Combo, ...]
    uses_apg: bool
    combine: CombineFn


def per_frame(x: Tensor, frames: int) -> Tensor:
    """View packed [B, L, C] as [B, T, L/T*C] (tokens are ordered t-major)."""
    return x.reshape(x.shape[0], frames, -1)


def clip_per_frame(diff: Tensor, frames: int, threshold: float) -> Tensor:
    """Scale each (batch, frame) slice of `diff` so its L2 norm is at most `threshold`."""
    if threshold <= 0:
        return diff
    view = per_frame(diff, frames)
    # A zero norm gives inf here, which the clamp turns into "no scaling".
    factor = (threshold / view.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    return (view * factor).reshape(diff.shape)


def project_per_frame(diff: Tensor, base: Tensor, frames: int, eta: float) -> Tensor:
    """Per frame, keep the part of `diff` orthogonal to `base` and scale the parallel part by eta."""
    # float64 because the parallel component is a small difference of large dot products.
    d = per_frame(diff, frames).double()
    b = F.normalize(per_frame(base, frames).double(), dim=-1, eps=_NORMALIZE_EPS)
    parallel = (d * b).sum(dim=-1, keepdim=True) * b
    return ((d - parallel) + eta * parallel).reshape(diff.shape).float()


def normalized_guidance(
    diff: Tensor,
    base: Tensor,
    frames: int,
    eta: float,
    threshold: float,
    momentum: float,
    buffer: MomentumBuffer,
) -> Tensor:
    """APG term N(diff; base): momentum, per-frame norm clipping, then per-frame projection."""
    running = buffer.update(diff, momentum)
    return project_per_frame(clip_per_frame(running, frames, threshold), base, frames, eta)


def _apg_term(diff: Tensor, base: Tensor, step: StepContext, term: str, index: int) -> Tensor:
    return normalized_guidance(
        diff,
        base,
        step.frames,
        eta=step.apg.eta,
        threshold=step.apg.threshold(index),
        momentum=step.apg.momentum,
        buffer=step.state.buffer(term),
    )


def _rv2v(e: Mapping[Combo, Tensor], step: StepContext) -> Tensor:
    s = step.scales
    return (
        e[NONE_U]
        + s.vid * (e[V_U] - e[NONE_U])
        + s.img * (e[VI_U] - e[V_U])
        + s.txt * (e[VI_C] - e[VI_U])
    )


def _v2v_chain(e: Mapping[Combo, Tensor], step: StepContext) -> Tensor:
    s = step.scales
    return e[NONE_U] + s.vid * (e[V_U] - e[NONE_U]) + s.txt * (e[VI_C] - e[V_U])


def _text_cfg(e: Mapping[Combo, Tensor], step: StepContext, *, uncond: Combo, cond: Combo) -> Tensor:
    return e[uncond] + step.scales.txt * (e[cond] - e[uncond])


def _text_apg(x: Mapping[Combo, Tensor], step: StepContext, *, uncond: Combo, cond: Combo) -> Tensor:
    return x[uncond] + step.scales.txt * _apg_term(x[cond] - x[uncond], x[cond], step, "txt", 0)


def _r2v_apg(x: Mapping[Combo, Tensor], step: StepContext) -> Tensor:
    s = step.scales
    img = _apg_term(x[I_U] - x[NONE_U], x[I_U], step, "img", 0)
    txt = _apg_term(x[I_C] - x[I_U], x[I_C], step, "txt", 1)
    return x[NONE_U] + s.img * img + s.txt * txt


_v2v = functools.partial(_text_cfg, uncond=VI_U, cond=VI_C)
_t2v = functools.partial(_text_cfg, uncond=NONE_U, cond=NONE_C)
_t2v_apg = functools.partial(_text_apg, uncond=NONE_U, cond=NONE_C)
_v2v_apg = functools.partial(_text_apg, uncond=VI_U, cond=VI_C)

GUIDANCE_MODES: dict[str, GuidanceMode] = {
    mode.name: mode
    for mode in (
        GuidanceMode("rv2v", (NONE_U, V_U, VI_U, VI_C), uses_apg=False, combine=_rv2v),
        GuidanceMode("v2v", (VI_U, VI_C), uses_apg=False, combine=_v2v),
        GuidanceMode("v2v_chain", (NONE_U, V_U, VI_C), uses_apg=False, combine=_v2v_chain),
        GuidanceMode("t2v", (NONE_U, NONE_C), uses_apg=False, combine=_t2v),
        GuidanceMode("t2v_apg", (NONE_U, NONE_C), uses_apg=True, combine=_t2v_apg),
        GuidanceMode("v2v_apg", (VI_U, VI_C), uses_apg=True, combine=_v2v_apg),
        GuidanceMode("r2v_apg", (NONE_U, I_U, I_C), uses_apg=True, combine=_r2v_apg),
    )
}


def get_mode(name: str) -> GuidanceMode:
    """Look up a guidance mode by name."""
    if name in GUIDANCE_MODES:
        return GUIDANCE_MODES[name]
    valid = ", ".join(GUIDANCE_MODES)
    if name in PLANNER_ONLY_MODES:
        raise ValueError(
            f"guidance mode {name!r} is a full-Bernini (planner) mode and is not supported by the "
            f"renderer; valid modes: {valid}"
        )
    raise ValueError(f"unknown guidance mode {name!r}; valid modes: {valid}")


def required_visuals(mode: GuidanceMode) -> set[str]:
    """Visual parts ("none", "V", "I", "VI") that the mode's combos use."""
    return {combo.visual for combo in mode.combos}


def new_state(mode: GuidanceMode | str) -> GuidanceState:
    """Fresh per-case state (empty momentum buffers) for `mode`."""
    return GuidanceState(mode=mode if isinstance(mode, str) else mode.name)


def _check_inputs(
    mode: GuidanceMode, preds: Mapping[Combo, Tensor], x_t: Tensor, frames: int, state: GuidanceState
) -> None:
    if state.mode != mode.name:
        raise ValueError(
            f"guidance state belongs to mode {state.mode!r}, not {mode.name!r}; use new_state(mode)"
        )
    missing = [str(combo) for combo in mode.combos if combo not in preds]
    if missing:
        needed = ", ".join(str(combo) for combo in mode.combos)
        raise ValueError(
            f"mode {mode.name!r} is missing prediction(s) {', '.join(missing)}; it needs {needed}"
        )
    if x_t.ndim != 3:
        raise ValueError(f"x_t must be packed [B, L, C], got shape {tuple(x_t.shape)}")
    if frames <= 0 or x_t.shape[1] % frames != 0:
        raise ValueError(
            f"frames={frames} must be positive and divide the token count L={x_t.shape[1]}"
        )
    for combo in mode.combos:
        if preds[combo].shape != x_t.shape:
            raise ValueError(
                f"prediction {combo} has shape {tuple(preds[combo].shape)}, "
                f"expected x_t shape {tuple(x_t.shape)}"
            )


def _check_sigma(mode: GuidanceMode, sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"APG mode {mode.name!r} needs sigma > 0 to map to x0 space and back, got sigma={sigma}; "
            "use the UniPC scheduler, whose sigmas stay > 0"
        )


def to_x0(x_t: Tensor, velocity: Tensor, sigma: float) -> Tensor:
    """Flow-matching x0 estimate x_t - sigma * v."""
    return x_t - sigma * velocity


def to_velocity(x_t: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """Velocity that maps x_t to the x0 estimate: (x_t - x0) / sigma."""
    return (x_t - x0) / sigma


def combine(
    mode: GuidanceMode,
    preds: Mapping[Combo, Tensor],
    x_t: Tensor,
    sigma: float,
    frames: int,
    scales: GuidanceScales,
    apg: APGSettings,
    state: GuidanceState,
) -> Tensor:
    """Combine the mode's per-combo velocity predictions into one float32 [B, L, C] velocity."""
    _check_inputs(mode, preds, x_t, frames, state)
    # Predictions may be bf16; the combination is done in float32.
    velocities = {combo: preds[combo].float() for combo in mode.combos}
    step = StepContext(scales=scales, frames=frames, apg=apg, state=state)
    if not mode.uses_apg:
        return mode.combine(velocities, step)
    _check_sigma(mode, sigma)
    x_t32 = x_t.float()
    x0 = {combo: to_x0(x_t32, v, sigma) for combo, v in velocities.items()}
    guided = mode.combine(x0, step)
    logger.debug("guidance %s at sigma=%.4f combined %d combos", mode.name, sigma, len(x0))
    return to_velocity(x_t32, guided, sigma)
