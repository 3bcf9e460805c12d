"""The denoise loop: noise, scheduler, expert switch with omega scaling, combos, guidance, step."""

from __future__ import annotations

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
from bernini.guidance import APGSettings, Combo, GuidanceMode, GuidanceScales, combine, new_state
from bernini.models.transformer import TextKV, WanTransformer

log = logging.getLogger(__name__)


def _select_rows(kv_all: TextKV, rows: list[int]) -> TextKV:
    """The text K/V rows for a batch of combos; a view when the rows are contiguous."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return [(k[rows[0] : rows[0] + len(rows)], v[rows[0] : rows[0] + len(rows)]) for k, v in kv_all]
    return [(k[rows], v[rows]) for k, v in kv_all]


class LocalCombos:
    """Combo placement for one process: it runs every combo. CFG parallel swaps in another."""

    def select(self, work: list[tuple[Combo, int]]) -> set[Combo]:
        """The combos this process computes, from (combo, sequence length) of the step."""
        return {combo for combo, _ in work}

    def exchange(self, preds: dict[Combo, torch.Tensor], combos: tuple[Combo, ...]) -> dict[Combo, torch.Tensor]:
        """Every combo's prediction, after sharing this process's ones with its peers."""
        return preds


class NonFiniteError(RuntimeError):
    """The latent stopped being finite; nothing is decoded or written."""


class EulerFlowScheduler:
    """The official --no-use_unipc fallback: Euler on shifted linspace(1, 0, N) sigmas, last one 0."""

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
    scales: GuidanceScales
    omega_scale: float
    apg: APGSettings
    steps: int
    shift: float
    use_unipc: bool
    boundary: float
    batch_combos: bool = True


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


class Denoiser:
    """Runs one case's loop. Combos with the same sequence share layouts and run as one batch."""

    def __init__(
        self,
        experts: Callable[[str], WanTransformer],
        expert_names: tuple[str, ...],
        scheduler_config: Mapping[str, Any],
        head_dim: int,
        device: torch.device,
        combos: "LocalCombos | None" = None,
        prefetch: Callable[[str], None] | None = None,
    ):
        self.combos = combos or LocalCombos()
        self.experts = experts
        self.prefetch = prefetch  # called with the next expert during the last step before a switch
        self.expert_names = expert_names
        self.scheduler_config = scheduler_config
        self.head_dim = head_dim
        self.device = device

    def _groups(self, plan: SamplingPlan, cond: Conditions, rule: SourceIdRule, target_grid) -> list[tuple[Layout, list[Combo]]]:
        groups: dict[tuple, tuple[Layout, list[Combo]]] = {}
        for combo in plan.mode.combos:
            sources = visual_sources(cond, combo.visual, rule)
            key = layout_key(sources)
            if key not in groups:
                groups[key] = (build_layout(sources, target_grid, self.head_dim, self.device), [])
            groups[key][1].append(combo)
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
        schedule = expert_schedule(timesteps, self.expert_names, plan.boundary)
        groups = self._groups(plan, cond, rule, target_grid)
        text_order = ("u", "c")
        text_batch = torch.cat([text[k] for k in text_order]).to(self.device)
        state = new_state(plan.mode)
        scales, switched = plan.scales, False
        x = noise.to(self.device)
        result = DenoiseResult(latent=x)
        cache: dict[str, tuple[TextKV, list[torch.Tensor | None]]] = {}

        for i, t in enumerate(timesteps):
            start = time.perf_counter()
            name = schedule[i]
            if name == "low" and not switched and "high" in self.expert_names:
                switched, scales = True, scales.scaled(plan.omega_scale)  # once, at the switch
            result.scales.setdefault(name, {"vid": scales.vid, "img": scales.img, "txt": scales.txt})
            model = self.experts(name)
            if self.prefetch is not None and i + 1 < len(schedule) and schedule[i + 1] != name:
                self.prefetch(schedule[i + 1])  # before this step's forward is queued, so the copy overlaps it
            if name not in cache:  # text K/V and condition tokens are fixed for the case
                cache.clear()
                cond_tokens = [self._embed_conditions(model, layout) for layout, _ in groups]
                cache[name] = (model.encode_text(text_batch), cond_tokens)
            kv_all, cond_tokens = cache[name]
            preds = self._predict(model, plan, groups, cond_tokens, kv_all, text_order, x, t)
            v = combine(plan.mode, preds, x, sigmas[i], target_grid[0], scales, plan.apg, state)
            x = scheduler.step(v, t, x).prev_sample
            if not torch.isfinite(x).all():
                raise NonFiniteError(
                    f"the latent became non-finite at step {i + 1}/{len(timesteps)} (t={float(t):.0f}) "
                    f"with the {name!r} expert, dtype {next(model.parameters()).dtype}, attention "
                    f"{attention.current_backend()}; try --dtype float32 or --attention sdpa"
                )
            seconds = time.perf_counter() - start
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

    def _predict(self, model, plan, groups, cond_tokens, kv_all, text_order, x, t) -> dict[Combo, torch.Tensor]:
        target = model.embed(x)
        preds: dict[Combo, torch.Tensor] = {}
        mine = self.combos.select([(c, layout.total_tokens) for layout, combos in groups for c in combos])
        for (layout, all_combos), cond in zip(groups, cond_tokens, strict=True):
            combos = [c for c in all_combos if c in mine]
            if not combos:
                continue
            tokens = target if cond is None else torch.cat([cond, target], dim=1)
            batches = [combos] if plan.batch_combos else [[c] for c in combos]
            for batch in batches:
                kv = _select_rows(kv_all, [text_order.index(c.text) for c in batch])
                timestep = t.float().expand(len(batch)).to(x.device)
                out = model(tokens.expand(len(batch), -1, -1), timestep, kv, (layout.cos, layout.sin))
                for j, combo in enumerate(batch):
                    preds[combo] = out[j : j + 1, -layout.target_tokens :]
        return self.combos.exchange(preds, plan.mode.combos)
