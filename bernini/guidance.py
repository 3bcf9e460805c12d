"""Guidance modes that combine per-pass Bernini-R DiT velocity predictions into one velocity, and which passes they need."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
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


class GuidancePass(NamedTuple):
    """One conditioning combination: visual part in VISUALS and text embedding in TEXTS."""

    visual: str
    text: str

    def __str__(self) -> str:
        return f"{self.visual}·{self.text}"


NONE_U = GuidancePass("none", "u")
NONE_C = GuidancePass("none", "c")
V_U = GuidancePass("V", "u")
I_U = GuidancePass("I", "u")
I_C = GuidancePass("I", "c")
VI_U = GuidancePass("VI", "u")
VI_C = GuidancePass("VI", "c")


@dataclass(frozen=True)
class GuidanceScales:
    """Omega values of one expert phase."""

    vid: float
    img: float
    txt: float

    def scaled(self, factor: float) -> GuidanceScales:
        """Return all three scales multiplied by `factor` (the omega_scale at the expert switch)."""
        return GuidanceScales(vid=self.vid * factor, img=self.img * factor, txt=self.txt * factor)

    def replaced(self, vid: float | None = None, img: float | None = None, txt: float | None = None) -> GuidanceScales:
        """These scales with the ones given replaced (None keeps a value)."""
        return GuidanceScales(
            vid=self.vid if vid is None else vid, img=self.img if img is None else img, txt=self.txt if txt is None else txt
        )


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
    """Everything a combine function may need besides the per-pass values."""

    scales: GuidanceScales
    frames: int
    apg: APGSettings
    state: GuidanceState


@dataclass(frozen=True)
class Term:
    """One guidance term: ``scale * G(plus - minus)``, G the plain difference or, in APG modes, N(d; plus)."""

    scale: str  # "vid" | "img" | "txt": the GuidanceScales field; also the name of its APG momentum buffer
    plus: GuidancePass  # the more conditioned side (APG projects onto it)
    minus: GuidancePass


@dataclass(frozen=True)
class GuidanceMode:
    """A guidance mode: ``base + sum(scale * G(plus - minus))`` over its terms (all seven modes have this form)."""

    name: str
    base: GuidancePass
    terms: tuple[Term, ...]
    uses_apg: bool

    @property
    def passes(self) -> tuple[GuidancePass, ...]:
        """The passes the full formula reads, base first, then each term's sides in order."""
        seen = [self.base]
        for term in self.terms:
            seen += [c for c in (term.plus, term.minus) if c not in seen]
        return tuple(seen)


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


def _evaluate(mode: GuidanceMode, values: Mapping[GuidancePass, Tensor], step: StepContext) -> Tensor:
    """base + sum(scale * G): velocities for the plain modes, x0 estimates for the APG ones."""
    out = values[mode.base]
    for index, term in enumerate(mode.terms):
        diff = values[term.plus] - values[term.minus]
        if mode.uses_apg:
            diff = normalized_guidance(
                diff, values[term.plus], step.frames, eta=step.apg.eta, threshold=step.apg.threshold(index),
                momentum=step.apg.momentum, buffer=step.state.buffer(term.scale),
            )
        out = out + getattr(step.scales, term.scale) * diff
    return out


def _mode(name: str, base: GuidancePass, *terms: tuple[str, GuidancePass, GuidancePass]) -> GuidanceMode:
    return GuidanceMode(name, base, tuple(Term(*t) for t in terms), uses_apg=name.endswith("_apg"))


GUIDANCE_MODES: dict[str, GuidanceMode] = {
    mode.name: mode
    for mode in (
        _mode("rv2v", NONE_U, ("vid", V_U, NONE_U), ("img", VI_U, V_U), ("txt", VI_C, VI_U)),
        _mode("v2v", VI_U, ("txt", VI_C, VI_U)),
        _mode("v2v_chain", NONE_U, ("vid", V_U, NONE_U), ("txt", VI_C, V_U)),
        _mode("t2v", NONE_U, ("txt", NONE_C, NONE_U)),
        _mode("t2v_apg", NONE_U, ("txt", NONE_C, NONE_U)),
        _mode("v2v_apg", VI_U, ("txt", VI_C, VI_U)),
        _mode("r2v_apg", NONE_U, ("img", I_U, NONE_U), ("txt", I_C, I_U)),
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
    """Visual parts ("none", "V", "I", "VI") that the mode's passes use."""
    return {pass_.visual for pass_ in mode.passes}


def new_state(mode: GuidanceMode | str) -> GuidanceState:
    """Fresh per-case state (empty momentum buffers) for `mode`."""
    return GuidanceState(mode=mode if isinstance(mode, str) else mode.name)


def _is_identity(apg: APGSettings, index: int) -> bool:
    """N(d; base) = d exactly (up to rounding) for APG term `index`: eta 1 (nothing projected) and no clipping.

    Clipping at a threshold > 0 depends on the norm of d, so it keeps both sides of the term in.
    """
    threshold = apg.threshold(index)
    return apg.eta == 1.0 and (threshold <= 0 or math.isinf(threshold))


def active_passes(
    mode: GuidanceMode, scales: GuidanceScales, apg: APGSettings, buffers_read_later: Collection[str] | None = None
) -> tuple[GuidancePass, ...]:
    """The passes whose predictions the mode's output depends on at these scales; the others carry zero weight.

    Every mode is ``base + sum(s * G(plus - minus))``. A term with s = 0 adds nothing. A term whose G is linear
    (plain modes; APG with eta 1, no clipping) adds +s to its plus side's coefficient and -s to its minus side's;
    a pass whose total coefficient is exactly 0 drops out (all scales 1: only the last term's plus side is left).
    A nonlinear APG term (eta != 1, or clipping) needs both sides whatever s is, unless s = 0.
    With momentum != 0 an APG term's buffer carries this step's difference into later steps, so a term in
    ``buffers_read_later`` (None: every term, the safe default) keeps both sides whatever its scale.
    """
    weights: dict[GuidancePass, float] = {mode.base: 1.0}
    needed: set[GuidancePass] = set()
    later = {t.scale for t in mode.terms} if buffers_read_later is None else set(buffers_read_later)
    for index, term in enumerate(mode.terms):
        s = getattr(scales, term.scale)
        if mode.uses_apg and apg.momentum != 0 and term.scale in later:
            needed |= {term.plus, term.minus}
        elif s == 0:
            continue
        elif mode.uses_apg and not _is_identity(apg, index):
            needed |= {term.plus, term.minus}
        else:
            weights[term.plus] = weights.get(term.plus, 0.0) + s
            weights[term.minus] = weights.get(term.minus, 0.0) - s
    needed |= {pass_ for pass_, weight in weights.items() if weight != 0}
    return tuple(pass_ for pass_ in mode.passes if pass_ in needed)


def _check_inputs(
    mode: GuidanceMode, preds: Mapping[GuidancePass, Tensor], needed: tuple[GuidancePass, ...], x_t: Tensor, frames: int, state: GuidanceState
) -> None:
    if state.mode != mode.name:
        raise ValueError(
            f"guidance state belongs to mode {state.mode!r}, not {mode.name!r}; use new_state(mode)"
        )
    missing = [str(pass_) for pass_ in needed if pass_ not in preds]
    if missing:
        names = ", ".join(str(pass_) for pass_ in needed)
        raise ValueError(
            f"mode {mode.name!r} is missing prediction(s) {', '.join(missing)}; it needs {names}"
        )
    if x_t.ndim != 3:
        raise ValueError(f"x_t must be packed [B, L, C], got shape {tuple(x_t.shape)}")
    if frames <= 0 or x_t.shape[1] % frames != 0:
        raise ValueError(
            f"frames={frames} must be positive and divide the token count L={x_t.shape[1]}"
        )
    for pass_ in mode.passes:
        if pass_ in preds and preds[pass_].shape != x_t.shape:
            raise ValueError(
                f"prediction {pass_} has shape {tuple(preds[pass_].shape)}, "
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
    preds: Mapping[GuidancePass, Tensor],
    x_t: Tensor,
    sigma: float,
    frames: int,
    scales: GuidanceScales,
    apg: APGSettings,
    state: GuidanceState,
    buffers_read_later: Collection[str] | None = None,
) -> Tensor:
    """Combine the mode's per-pass velocity predictions into one float32 [B, L, C] velocity.

    `preds` may leave out passes that carry zero weight at these scales (:func:`active_passes`).
    """
    needed = active_passes(mode, scales, apg, buffers_read_later)
    _check_inputs(mode, preds, needed, x_t, frames, state)
    # Predictions may be bf16; the combination is done in float32.
    velocities = {pass_: preds[pass_].float() for pass_ in mode.passes if pass_ in preds}
    # A left-out pass has coefficient 0, so any finite stand-in gives the same result; the first needed pass
    # turns the differences it enters into 0 (all scales 1: every difference, and the output is that pass).
    stand_in = velocities[needed[0]]  # never empty: the coefficients always sum to 1
    velocities = {pass_: velocities.get(pass_, stand_in) for pass_ in mode.passes}
    step = StepContext(scales=scales, frames=frames, apg=apg, state=state)
    if not mode.uses_apg:
        return _evaluate(mode, velocities, step)
    _check_sigma(mode, sigma)
    x_t32 = x_t.float()
    x0 = {pass_: to_x0(x_t32, v, sigma) for pass_, v in velocities.items()}
    guided = _evaluate(mode, x0, step)
    logger.debug("guidance %s at sigma=%.4f combined %d of %d passes", mode.name, sigma, len(needed), len(mode.passes))
    return to_velocity(x_t32, guided, sigma)
