"""The denoise loop: noise, scheduler, expert switch with per-expert omega, the passes each step needs, guidance, step."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bernini import attention
from bernini.conditioning import Conditions, Layout, SourceIdRule, build_layout, layout_key, visual_sources
from bernini.config import GenerationSettings
from bernini.guidance import APGSettings, GuidanceMode, GuidancePass, GuidanceScales, active_passes, combine, new_state
from bernini.models import TextKV, WanTransformer

log = logging.getLogger(__name__)


def _select_rows(kv_all: TextKV, rows: list[int]) -> TextKV:
    """The text K/V rows for a batch of passes; a view when the rows are contiguous."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return [(k[rows[0] : rows[0] + len(rows)], v[rows[0] : rows[0] + len(rows)]) for k, v in kv_all]
    return [(k[rows], v[rows]) for k, v in kv_all]


class LocalPasses:
    """Pass placement for one process: it runs every pass. CFG parallel swaps in another."""

    def select(self, work: list[tuple[GuidancePass, int]]) -> set[GuidancePass]:
        """The passes this process computes, from (pass, sequence length) of the step."""
        return {pass_ for pass_, _ in work}

    def exchange(self, preds: dict[GuidancePass, torch.Tensor], passes: tuple[GuidancePass, ...]) -> dict[GuidancePass, torch.Tensor]:
        """Every pass's prediction, after sharing this process's ones with its peers."""
        return preds


class NonFiniteError(RuntimeError):
    """The latent stopped being finite; nothing is decoded or written."""


# Wan2.2's scheduler_config.json: what the dry run plans steps with before any checkpoint is read.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
    "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "final_sigmas_type": "zero",
    "timestep_spacing": "linspace", "num_train_timesteps": 1000,
}


class EulerFlowScheduler:
    """The official --no-use_unipc fallback (--solver euler): Euler on shifted linspace(1, 0, N) sigmas, last one 0.

    Its last step goes from sigma 0 to 0 and cannot move the latent. Written here because diffusers'
    FlowMatchEulerDiscreteScheduler, given the same sigmas, shifts them in float32 and differs in the last bits.
    """

    def __init__(self, shift: float, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def set_timesteps(self, steps: int, device: torch.device | str = "cpu") -> None:
        s = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        self.sigmas = torch.cat([s, s.new_zeros(1)]).float()
        self.timesteps = (s * self.num_train_timesteps).to(device)
        self._index = 0

    def step(self, velocity: torch.Tensor, timestep: Any, sample: torch.Tensor) -> Any:
        dt = self.sigmas[self._index + 1] - self.sigmas[self._index]
        self._index += 1
        return type("Out", (), {"prev_sample": sample + dt.item() * velocity.float()})


def make_scheduler(scheduler_config: Mapping[str, Any], shift: float, use_unipc: bool):
    """A fresh scheduler per render, so --flow_shift is honoured per call (upstream froze it at load)."""
    if not use_unipc:
        return EulerFlowScheduler(shift, scheduler_config.get("num_train_timesteps", 1000))
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(dict(scheduler_config), flow_shift=shift)


def set_official_timesteps(scheduler, steps: int, device: torch.device | str) -> None:
    """Timesteps on the official renderer's flow-sigma grid (diffusers 0.35.2), whatever diffusers is installed.

    diffusers 0.35 used flip(1 - linspace(1, 1/1000, N+1))[:-1] before the shift; later releases use
    linspace(1, 1/1000, N+1)[:-1], which moves every timestep a little (and at shift 3 the expert
    switch by one step). Passing the old grid explicitly keeps results identical to the official code.
    """
    if isinstance(scheduler, EulerFlowScheduler):
        scheduler.set_timesteps(steps, device=device)
        return
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(steps, device=device)  # old diffusers: this is already the official grid
        return
    n_train = scheduler.config.num_train_timesteps
    grid = np.flip(1 - np.linspace(1, 1 / n_train, steps + 1))[:-1].copy()
    scheduler.set_timesteps(sigmas=grid, device=device)


def expert_schedule(timesteps: torch.Tensor, experts: tuple[str, ...], boundary: float) -> list[str]:
    """'high' while int(t) >= boundary * 1000 (and a high expert exists), else 'low'."""
    if experts == ("high",) or experts == ("low",):
        return [experts[0]] * len(timesteps)
    return ["high" if int(t) >= boundary * 1000 else "low" for t in timesteps]


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 noise from a CPU generator, so every device and rank draws the same numbers."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@dataclass(frozen=True)
class SamplingPlan:
    """What the loop needs besides the models: the mode, scales and the scheduler settings."""

    mode: GuidanceMode
    scales: GuidanceScales  # the high expert's (and a single expert's)
    omega_scale: float
    apg: APGSettings
    steps: int
    shift: float
    use_unipc: bool
    boundary: float
    batch_passes: bool = True
    low: tuple[float | None, float | None, float | None] = (None, None, None)  # explicit low-expert (vid, img, txt)
    switch_step: int | None = None  # number of high-expert steps; None: the boundary rule
    skip_zero_passes: bool = True

    def expert_scales(self, experts: tuple[str, ...]) -> dict[str, GuidanceScales]:
        """The high expert's ω as given; the low one's explicit values, else the high ones x omega_scale (the switch rule)."""
        switched = self.scales.scaled(self.omega_scale) if "high" in experts else self.scales
        return {"high": self.scales, "low": switched.replaced(*self.low)}


def sampling_plan(settings: GenerationSettings, mode: GuidanceMode, boundary: float, batch_passes: bool = True) -> SamplingPlan:
    """The loop's plan from the generation settings; the renderer's config gives the switch boundary."""
    return SamplingPlan(
        mode=mode,
        scales=GuidanceScales(settings.omega_vid, settings.omega_img, settings.omega_txt),
        omega_scale=settings.omega_scale,
        apg=APGSettings(settings.eta, tuple(settings.norm_threshold), settings.momentum),
        steps=settings.num_inference_steps,
        shift=settings.flow_shift,
        use_unipc=settings.use_unipc,
        boundary=boundary,
        batch_passes=batch_passes,
        low=(settings.omega_vid_low, settings.omega_img_low, settings.omega_txt_low),
        switch_step=settings.switch_step,
        skip_zero_passes=settings.skip_zero_passes,
    )


@dataclass(frozen=True)
class Step:
    """One step of a case: its expert, its ω, and the guidance passes it runs (none: it cannot move the latent)."""

    index: int
    expert: str
    scales: GuidanceScales
    passes: tuple[GuidancePass, ...]
    buffers_read_later: frozenset[str] = frozenset()  # APG terms whose momentum a later step reads


def step_experts(plan: SamplingPlan, timesteps: torch.Tensor, experts: tuple[str, ...]) -> list[str]:
    """The expert of every step: the first --switch_step steps high and the rest low, or the boundary rule."""
    if plan.switch_step is None:
        return expert_schedule(timesteps, experts, plan.boundary)
    if experts != ("high", "low"):
        raise ValueError(f"--switch_step needs both experts, but this model has only {experts[0]!r}; drop --switch_step")
    if not 0 <= plan.switch_step <= len(timesteps):
        raise ValueError(f"--switch_step {plan.switch_step} is outside 0..{len(timesteps)} (the number of steps)")
    return ["high"] * plan.switch_step + ["low"] * (len(timesteps) - plan.switch_step)


def plan_steps(plan: SamplingPlan, timesteps: torch.Tensor, sigmas: list[float], experts: tuple[str, ...]) -> list[Step]:
    """Every step's expert, ω and passes; with skip_zero_passes, passes of zero weight and steps of dt 0 are left out.

    An Euler step moves x by (sigma_next - sigma) * v: when that is 0 (the official grid's last step), no pass
    can change the result. UniPC's update is not of that form, so its steps always run.
    """
    names = step_experts(plan, timesteps, experts)
    scales = plan.expert_scales(experts)
    still = [plan.skip_zero_passes and not plan.use_unipc and sigmas[i + 1] == sigmas[i] for i in range(len(names))]
    steps: list[Step] = []
    read_later: frozenset[str] = frozenset()
    for i in reversed(range(len(names))):  # backwards, so each step knows which momentum buffers later steps read
        s = scales[names[i]]
        if still[i]:
            steps.append(Step(i, names[i], s, ()))
            continue
        passes = active_passes(plan.mode, s, plan.apg, read_later) if plan.skip_zero_passes else plan.mode.passes
        steps.append(Step(i, names[i], s, passes, read_later))
        if plan.mode.uses_apg and plan.apg.momentum != 0:
            read_later = read_later | {t.scale for t in plan.mode.terms if getattr(s, t.scale) != 0}
    return steps[::-1]


@functools.lru_cache(maxsize=64)
def preview_steps(settings: GenerationSettings, mode: GuidanceMode, experts: tuple[str, ...] = ("high", "low"), boundary: float = 0.875) -> tuple[Step, ...]:
    """The steps a render will run, planned before any checkpoint is read (Wan2.2's scheduler config, A14B's boundary)."""
    plan = sampling_plan(settings, mode, boundary)
    scheduler = make_scheduler(DEFAULT_SCHEDULER_CONFIG, plan.shift, plan.use_unipc)
    set_official_timesteps(scheduler, plan.steps, "cpu")
    return tuple(plan_steps(plan, scheduler.timesteps, scheduler.sigmas.tolist(), experts))


@dataclass
class StepEvent:
    index: int
    total: int
    expert: str
    timestep: float
    seconds: float


@dataclass
class DenoiseResult:
    latent: torch.Tensor  # packed [1, L_target, F] float32
    expert_steps: dict[str, int] = field(default_factory=dict)
    expert_seconds: dict[str, float] = field(default_factory=dict)
    scales: dict[str, dict[str, float]] = field(default_factory=dict)
    passes: list[int] = field(default_factory=list)  # guidance passes each step ran


class Denoiser:
    """Runs one case's loop. Passes with the same sequence share layouts and run as one batch."""

    def __init__(
        self,
        experts: Callable[[str], WanTransformer],
        expert_names: tuple[str, ...],
        scheduler_config: Mapping[str, Any],
        head_dim: int,
        device: torch.device,
        passes: "LocalPasses | None" = None,
        prefetch: Callable[[str], None] | None = None,
    ):
        self.passes = passes or LocalPasses()
        self.experts = experts
        self.prefetch = prefetch  # called with the next expert during the last step before a switch
        self.expert_names = expert_names
        self.scheduler_config = scheduler_config
        self.head_dim = head_dim
        self.device = device

    def _groups(self, plan: SamplingPlan, cond: Conditions, rule: SourceIdRule, target_grid) -> list[tuple[Layout, list[GuidancePass]]]:
        groups: dict[tuple, tuple[Layout, list[GuidancePass]]] = {}
        for pass_ in plan.mode.passes:
            sources = visual_sources(cond, pass_.visual, rule)
            key = layout_key(sources)
            if key not in groups:
                groups[key] = (build_layout(sources, target_grid, self.head_dim, self.device), [])
            groups[key][1].append(pass_)
        return list(groups.values())

    def run(
        self,
        plan: SamplingPlan,
        cond: Conditions,
        rule: SourceIdRule,
        target_grid: tuple[int, int, int],
        noise: torch.Tensor,
        text: Mapping[str, torch.Tensor],
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> DenoiseResult:
        """noise: packed [1, L, F]; text: {'u': [1, 512, D], 'c': [1, 512, D]}."""
        scheduler = make_scheduler(self.scheduler_config, plan.shift, plan.use_unipc)
        set_official_timesteps(scheduler, plan.steps, self.device)
        timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.tolist()
        steps = plan_steps(plan, timesteps, sigmas, self.expert_names)
        groups = self._groups(plan, cond, rule, target_grid)
        text_order = ("u", "c")
        text_batch = torch.cat([text[k] for k in text_order]).to(self.device)
        state = new_state(plan.mode)
        x = noise.to(self.device)
        result = DenoiseResult(latent=x)
        cache: dict[str, tuple[TextKV, list[torch.Tensor | None]]] = {}
        working = [step for step in steps if step.passes]

        for step, t in zip(steps, timesteps, strict=True):
            start = time.perf_counter()
            i, name = step.index, step.expert
            result.scales.setdefault(name, {"vid": step.scales.vid, "img": step.scales.img, "txt": step.scales.txt})
            if not step.passes:  # dt is 0: x + 0 * v is x whatever v is, so no forward can matter
                x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
            else:
                model = self.experts(name)
                upcoming = next((s.expert for s in working if s.index > i), name)
                if self.prefetch is not None and upcoming != name:
                    self.prefetch(upcoming)  # before this step's forward is queued, so the copy overlaps it
                if name not in cache:  # text K/V and condition tokens are fixed for the case
                    cache.clear()
                    cond_tokens = [self._embed_conditions(model, layout) for layout, _ in groups]
                    cache[name] = (model.encode_text(text_batch), cond_tokens)
                kv_all, cond_tokens = cache[name]
                preds = self._predict(model, plan, groups, cond_tokens, kv_all, text_order, x, t, step.passes)
                v = combine(plan.mode, preds, x, sigmas[i], target_grid[0], step.scales, plan.apg, state, step.buffers_read_later)
                x = scheduler.step(v, t, x).prev_sample
                if not torch.isfinite(x).all():
                    raise NonFiniteError(
                        f"the latent became non-finite at step {i + 1}/{len(timesteps)} (t={float(t):.0f}) "
                        f"with the {name!r} expert, dtype {next(model.parameters()).dtype}, attention "
                        f"{attention.current_backend()}; try --dtype float32 or --attention sdpa"
                    )
            seconds = time.perf_counter() - start
            result.passes.append(len(step.passes))
            result.expert_steps[name] = result.expert_steps.get(name, 0) + 1
            result.expert_seconds[name] = result.expert_seconds.get(name, 0.0) + seconds
            if on_step is not None:
                on_step(StepEvent(i, len(timesteps), name, float(t), seconds))
        result.latent = x
        return result

    @staticmethod
    def _embed_conditions(model: WanTransformer, layout: Layout) -> torch.Tensor | None:
        patches = layout.condition_patches()
        return None if patches is None else model.embed(patches.to(model.proj_out.weight.device))

    def _predict(self, model, plan, groups, cond_tokens, kv_all, text_order, x, t, passes) -> dict[GuidancePass, torch.Tensor]:
        target = model.embed(x)
        preds: dict[GuidancePass, torch.Tensor] = {}
        mine = self.passes.select([(c, layout.total_tokens) for layout, group in groups for c in group if c in passes])
        for (layout, group), cond in zip(groups, cond_tokens, strict=True):
            here = [c for c in group if c in mine]
            if not here:
                continue
            tokens = target if cond is None else torch.cat([cond, target], dim=1)
            batches = [here] if plan.batch_passes else [[c] for c in here]
            for batch in batches:
                kv = _select_rows(kv_all, [text_order.index(c.text) for c in batch])
                timestep = t.float().expand(len(batch)).to(x.device)
                out = model(tokens.expand(len(batch), -1, -1), timestep, kv, (layout.cos, layout.sin))
                for j, pass_ in enumerate(batch):
                    preds[pass_] = out[j : j + 1, -layout.target_tokens :]
        return self.passes.exchange(preds, passes)
