"""The Python API: load the models once, render many cases (dicts or Case objects), optionally written as the CLI writes them."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bernini import media
from bernini.cases import BatchSpec, Case, CaseError, assign_outputs, parse_case
from bernini.config import DEFAULT_CONFIG_DIR, GenerationSettings, RuntimeConfig
from bernini.offload.sizes import Workload
from bernini.pipeline import ModelSources, Renderer, RenderOutput, resolve_sources
from bernini.plan import CasePlan, plan_all, plan_case
from bernini.runner import CaseRecord, model_identity, sidecar, sidecar_path, write_json_atomic
from bernini.sampling import StepEvent

__all__ = ["Engine", "Result", "settings_with"]

CASE_SOURCE = "case"  # how validation messages name a case given as a dict (the CLI names the case file)
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(GenerationSettings))


class RenderCall(Protocol):
    """Renderer.render's signature; a multi-GPU group passes its own (None on ranks that do not decode)."""

    def __call__(
        self, case: Case, settings: GenerationSettings, *, plan: CasePlan | None = None, prompt: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> RenderOutput | None: ...


@dataclass(frozen=True)
class Result:
    """One rendered case: its frames and everything the CLI records about it."""

    frames: np.ndarray  # [T, H, W, 3] float32 in [0, 1]
    plan: CasePlan  # the effective size, frames, mode, tokens
    output: Path | None  # the written file (write=True), else None
    sidecar: Path | None  # its JSON sidecar (write=True), else None
    record: CaseRecord  # the case's line of summary.json
    timings: dict[str, float]  # seconds per phase
    prompt_used: str  # the prompt the text encoder saw (system prompt included)
    info: dict[str, Any]  # guidance per expert, expert steps, attention backend, dtype, device, memory plan
    latent: torch.Tensor | None  # the final normalized latent [1, 16, T', H', W']


def settings_with(base: GenerationSettings, overrides: GenerationSettings | Mapping[str, Any] | None) -> GenerationSettings:
    """``base`` with a dict of overrides (or replaced by whole settings); ValueError names an unknown or bad field."""
    if overrides is None:
        return base
    if isinstance(overrides, GenerationSettings):
        return overrides
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown generation setting {unknown[0]!r}; GenerationSettings has: {', '.join(SETTING_NAMES)}")
    values = dict(overrides)
    if "norm_threshold" in values:
        values["norm_threshold"] = tuple(values["norm_threshold"])
    return dataclasses.replace(base, **values)


class Engine:
    """Loaded models that render case after case; the CLI, the demo and servers all render through one.

    ``render`` is serialized (one case at a time on these models) and may be called from any thread.
    """

    def __init__(
        self,
        renderer: Renderer,
        sources: ModelSources,
        *,
        settings: GenerationSettings = GenerationSettings(),
        identity: dict[str, Any] | None = None,
        runtime: RuntimeConfig | None = None,
        render: RenderCall | None = None,
    ) -> None:
        self.renderer = renderer
        self.sources = sources
        self.settings = settings  # the defaults of every render call
        self.identity = model_identity(sources) if identity is None else identity  # the checkpoint, as sidecars record it
        self.runtime = runtime or renderer.runtime  # as requested; sidecars record it, its dtype is part of the fingerprint
        self.load_seconds: float | None = round(renderer.load_seconds, 3)
        self._render = render  # None: renderer.render, looked up per call
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        config: str = DEFAULT_CONFIG_DIR,
        high_noise_ckpt: str | None = None,
        low_noise_ckpt: str | None = None,
        *,
        runtime: RuntimeConfig = RuntimeConfig(),
        settings: GenerationSettings = GenerationSettings(),
        workload: Workload | None = None,
    ) -> Engine:
        """Resolve the checkpoint (as --config/--high_noise_ckpt/--low_noise_ckpt do) and load every model once.

        ``workload``: the largest case to plan memory for (``offload.workload_of(plans)``); 480p t2v when None.
        """
        return cls.from_sources(resolve_sources(config, high_noise_ckpt, low_noise_ckpt), runtime=runtime, settings=settings, workload=workload)

    @classmethod
    def from_sources(
        cls,
        sources: ModelSources,
        *,
        runtime: RuntimeConfig = RuntimeConfig(),
        settings: GenerationSettings = GenerationSettings(),
        workload: Workload | None = None,
        identity: dict[str, Any] | None = None,
    ) -> Engine:
        return cls(Renderer.load(sources, runtime, workload), sources, settings=settings, identity=identity, runtime=runtime)

    def render(
        self,
        case: Case | Mapping[str, Any],
        settings: GenerationSettings | Mapping[str, Any] | None = None,
        *,
        output: str | Path | None = None,
        write: bool = False,
        on_step: Callable[[StepEvent], None] | None = None,
        base: str | Path | None = None,
        plan: CasePlan | None = None,
        prompt: str | None = None,
        pe_info: dict[str, Any] | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> Result | None:
        """Render one case; with ``write`` the file and its sidecar are written atomically, as the CLI writes them.

        case: a case-file dict (media paths relative to ``base``, default the working directory) or a Case.
        settings: GenerationSettings, or a dict of overrides of the engine's settings.
        output: where the file goes (default: the case's 'output', else outputs/<name>.mp4|.png).
        on_step: hears every denoising step; an exception it raises stops the case (nothing is written).
        plan, prompt, pe_info, timings: what a batch driver already knows (the case's plan, the enhanced prompt and
        the enhancer's sidecar record, seconds spent on the case before this call).
        Raises CaseError (bad case), MediaError, NonFiniteError, torch.cuda.OutOfMemoryError. None only on a rank of a
        multi-GPU group that does not decode (its group's leader returns the result).
        """
        settings = settings_with(self.settings, settings)
        if plan is None:
            case, plan = self.plan(case, settings, output=output, base=base, check_output=write)
        elif not isinstance(case, Case):
            raise TypeError("a plan goes with the Case it was made for, not a dict")
        spent = dict(timings or {})
        started = time.perf_counter() - sum(spent.values())  # the total counts what the caller spent on the case
        with self._lock, self._on_device():
            out = (self._render or self.renderer.render)(case, settings, plan=plan, prompt=prompt, on_step=on_step)
            if out is None:
                return None
            spent.update(out.timings)
            written = None
            if write:
                clock = time.perf_counter()
                written = media.write_media(out.frames, Path(plan.output), plan.fps)
                spent["write"] = time.perf_counter() - clock
                spent["total"] = time.perf_counter() - started
                write_json_atomic(sidecar_path(written), sidecar(case, plan, out, settings, self.identity, self.runtime, pe_info, spent, self.load_seconds))
            spent["total"] = time.perf_counter() - started
        record = CaseRecord(case.name, case.source, "ok", output=plan.output, plan=plan.to_dict(), timings=spent)
        return Result(out.frames, plan, written, sidecar_path(written) if written else None, record, spent, out.prompt_used, out.info, out.latent)

    def plan(
        self, case: Case | Mapping[str, Any], settings: GenerationSettings, *, output: str | Path | None = None,
        base: str | Path | None = None, check_output: bool = False,
    ) -> tuple[Case, CasePlan]:
        """Validate a case exactly as a case file is validated, give it its output, and plan it (probing its media)."""
        if output is not None and not isinstance(case, Case):
            case = {**case, "output": str(output)}
        if not isinstance(case, Case):
            case = parse_case(case, source=CASE_SOURCE, name=CASE_SOURCE, base=Path(base).resolve() if base else None)
            case = dataclasses.replace(case, name=case.output.stem if case.output is not None else case.task_type)
        elif output is not None:
            case = dataclasses.replace(case, output=Path(output).expanduser(), explicit_output=True)
        errors: list[tuple[str, str]] = []
        placed = assign_outputs([case], BatchSpec(), errors)
        planned = plan_all(placed, settings, errors) if check_output else [(c, plan_case(c, settings)) for c in placed]
        if errors:
            raise CaseError(errors[0][1])
        return planned[0]

    def _on_device(self) -> AbstractContextManager[Any]:
        # A worker thread's current CUDA device is 0 whatever the renderer's is (a server's, gradio's).
        device = self.renderer.device
        return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
