"""Browser requests checked like the CLI's cases and rendered one at a time, by every rank of the launch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from bernini.cases import Case, CaseError, check_task_inputs, parse_case
from bernini.config import GenerationSettings, value_type
from bernini.driver import Session
from bernini.lora import LoraRef, resolve
from bernini.parallel import LocalPeers, Peers
from bernini.plan import CasePlan, plan_case
from bernini.presets import get_preset
from bernini.runner import CaseRecord, sidecar_path
from bernini.sampling import StepEvent
from bernini.tasks import Task

REQUEST_SOURCE = "request"  # how validation messages name a browser request (the CLI says the case file)
# The GenerationSettings fields the page sets; each converts to its field's type.
KNOBS = (
    "seed", "num_inference_steps", "num_frames", "max_image_size", "height", "width", "fps", "flow_shift",
    "omega_vid", "omega_img", "omega_txt", "omega_scale", "omega_vid_low", "omega_img_low", "omega_txt_low", "use_unipc", "preset",
)  # fmt: skip

Enhance = Callable[[Case], tuple[str, dict[str, Any]]]


class Cancelled(CaseError):
    """The user stopped the request; a CaseError so that the driver reports it in one line, no traceback."""


class RenderError(RuntimeError):
    """A valid request whose render failed (out of memory, non-finite latent, a peer rank failed...)."""


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class DemoRequest:
    """One browser request: the case keys plus the generation knobs the page sets."""

    task_type: str
    prompt: str
    guidance_mode: str | None = None  # None: the task's default
    videos: tuple[str, ...] = ()
    image: str | None = None
    images: tuple[str, ...] = ()
    use_pe: bool = False
    knobs: Mapping[str, Any] = field(default_factory=dict)  # GenerationSettings fields (KNOBS)
    loras: tuple[tuple[str, float, str], ...] = ()  # picked LoRAs: (file in --lora_dir, scale, "lora" | "lora_high" | "lora_low")

    def case_data(self) -> dict[str, Any]:
        """The request as a case-file object, so parse_case checks it exactly like the CLI."""
        data: dict[str, Any] = {"task_type": self.task_type, "prompt": self.prompt}
        if self.guidance_mode:
            data["guidance_mode"] = self.guidance_mode
        if self.videos:
            data["video"] = list(self.videos)
        if self.image:
            data["image"] = self.image
        if self.images:
            data["images"] = list(self.images)
        return data


def settings_with(base: GenerationSettings, knobs: Mapping[str, Any]) -> GenerationSettings:
    """The launch settings with the page's knobs; ValueError names a bad one."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown generation setting {unknown[0]!r}; the page sets: {', '.join(KNOBS)}")
    values: dict[str, Any] = {}
    for name, value in knobs.items():
        if value is None:
            continue
        if name == "preset":
            values[name] = get_preset(str(value)).name if value and value != "none" else None
            continue
        try:
            values[name] = value_type(GenerationSettings, name)(value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid generation setting: {name} must be a number, got {value!r}") from None
    return replace(base, **values)


@dataclass(frozen=True)
class Job:
    """A validated request, as every rank renders it."""

    case: Case
    plan: CasePlan
    settings: GenerationSettings
    prompt: str
    pe_info: dict[str, Any] | None = None
    loras: tuple[LoraRef, ...] | None = None  # the LoRAs the experts must hold; None: whatever they hold


@dataclass(frozen=True)
class DemoResult:
    output: Path
    sidecar: Path
    kind: str  # image | video
    prompt: str  # the prompt rendered (after the enhancer), without the task's system prompt
    status: str


# ---------------------------------------------------------------- ranks


def _ignore(event: StepEvent) -> None:
    pass


class StepProgress:
    """The driver's Progress for one request: reports each step and raises Cancelled between steps."""

    def __init__(self, stop: Callable[[], bool], report: Callable[[StepEvent], None] | None = None) -> None:
        self.stop = stop
        self.report = report or _ignore

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None:
        pass

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None:
        if self.stop():
            raise Cancelled(f"cancelled after step {event.index + 1}/{event.total}; nothing was saved")
        self.report(event)

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None:
        pass

    def close(self) -> None:
        pass


class JobRunner:
    """Renders jobs through the driver's Session, so outputs are written atomically with the CLI's sidecar."""

    def __init__(self, session: Session, peers: Peers | None = None) -> None:
        self.session = session
        self.peers = peers or LocalPeers()

    def run(self, job: Job, progress: StepProgress) -> CaseRecord:
        """Rank 0: share the job with the other ranks, then render it with them."""
        self.peers.send(job)
        return self.run_here(job, progress)

    def run_here(self, job: Job, progress: StepProgress) -> CaseRecord:
        # The prompt was enhanced once on rank 0; every rank renders that one.
        return self.session.run_case(job.case, job.plan, settings=job.settings, prompt=(job.prompt, job.pe_info), progress=progress)

    def serve_peer(self) -> None:
        """Ranks > 0: render what rank 0 sends until it sends None."""
        while (job := self.peers.receive()) is not None:
            self.run_here(job, StepProgress(lambda: self.peers.agree(False)))


class DemoService:
    """Validates requests like the CLI and renders them one at a time; what the page and tests call."""

    def __init__(
        self,
        runner: JobRunner,
        settings: GenerationSettings,
        save_dir: Path,
        enhance: Enhance | None = None,
        lora_dir: Path | None = None,
        switch_loras: Callable[[tuple[LoraRef, ...]], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.save_dir = save_dir.resolve()
        self.enhance = enhance
        if lora_dir is not None and not lora_dir.is_dir():
            raise ValueError(f"--lora_dir {lora_dir} is not a folder")
        self.lora_dir = lora_dir.resolve() if lora_dir is not None else None  # the page's LoRA picker lists its files
        self.switch_loras = switch_loras  # reloads the experts with other LoRAs (merged at load); None under torchrun
        # One render at a time even when gradio abandons a cancelled call's thread (it cannot kill it).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._session: str | None = None

    def prepare(self, request: DemoRequest) -> Job:
        """Check the request exactly as the CLI checks a case file; CaseError/ValueError say what is wrong."""
        if request.use_pe and self.enhance is None:
            raise ValueError("the prompt enhancer is off: start the demo with --use_pe to use it")
        settings = settings_with(self.settings, request.knobs)
        case = parse_case(request.case_data(), source=REQUEST_SOURCE, name="request", base=None)
        check_task_inputs(case)  # the page offers only the task's inputs: a missing one is the user's slip
        name = f"{case.task_type}_{datetime.now():%Y%m%d_%H%M%S_%f}"
        case = replace(case, name=name, output=self._free_output(name, case.task), explicit_output=True)
        plan = plan_case(case, settings)
        loras = self._picked_loras(request.loras)
        prompt, pe_info = self._enhanced(case) if request.use_pe else (case.prompt, None)
        return Job(case, plan, settings, prompt, pe_info, loras)

    def lora_files(self) -> list[str]:
        """The .safetensors files of --lora_dir, as the picker names them."""
        return sorted(str(p.relative_to(self.lora_dir)) for p in self.lora_dir.rglob("*.safetensors")) if self.lora_dir else []

    def loaded_loras(self) -> tuple[LoraRef, ...]:
        return self.runner.session.engine.runtime.loras

    def _picked_loras(self, picked: tuple[tuple[str, float, str], ...]) -> tuple[LoraRef, ...] | None:
        """The launch's LoRAs from folders other than --lora_dir, plus the picked ones; None without a picker."""
        if self.lora_dir is None:
            if picked:
                raise ValueError("no LoRA folder: start the demo with --lora_dir DIR to pick LoRAs")
            return None
        unknown = [name for name, _, _ in picked if name not in self.lora_files()]
        if unknown:
            raise ValueError(f"LoRA {unknown[0]!r} is not a .safetensors file of {self.lora_dir}")
        kept = tuple(r for r in self.loaded_loras() if not Path(r.file).resolve().is_relative_to(self.lora_dir))
        return kept + resolve([(flag, f"{self.lora_dir / name}:{scale}") for name, scale, flag in picked])

    def _enhanced(self, case: Case) -> tuple[str, dict[str, Any] | None]:
        assert self.enhance is not None
        try:
            return self.enhance(case)
        except Exception as exc:  # an outside service (--pe_on_error fail): any failure ends this request only
            raise RenderError(f"prompt enhancement failed: {type(exc).__name__}: {exc}") from exc

    def _free_output(self, name: str, task: Task) -> Path:
        suffix = ".png" if task.single_frame else ".mp4"
        path, n = self.save_dir / f"{name}{suffix}", 2
        while path.exists():
            path, n = self.save_dir / f"{name}_{n}{suffix}", n + 1
        return path

    def generate(self, request: DemoRequest, report: Callable[[StepEvent], None] | None = None, session: str | None = None) -> DemoResult:
        """Validate, render and save; raises ValueError (bad request), Cancelled or RenderError."""
        job = self.prepare(request)
        with self._lock:
            self._session = session
            self._stop.clear()
            try:
                if job.loras is not None and job.loras != self.loaded_loras():
                    if self.switch_loras is None:
                        raise ValueError("LoRAs are fixed at launch under torchrun (--lora); the picker works in a one-process demo")
                    self.switch_loras(job.loras)  # merged at load: the experts load again, once per new set
                record = self.runner.run(job, StepProgress(lambda: self.runner.peers.agree(self._stop.is_set()), report))
                stopped = self._stop.is_set()
            finally:
                self._session = None
        return self._result(job, record, stopped)

    def cancel(self, session: str | None = None) -> bool:
        """Stop the running request at its next step if it belongs to `session`; True if one was asked to stop."""
        if not self._lock.locked() or self._session != session:
            return False
        self._stop.set()
        return True

    def _result(self, job: Job, record: CaseRecord, stopped: bool) -> DemoResult:
        if record.status != "ok":
            if stopped:
                raise Cancelled(record.error or "cancelled")
            raise RenderError(f"the render failed: {record.error}")
        plan, output = job.plan, Path(job.plan.output)
        seconds = record.timings.get("total", 0.0)
        status = f"saved {output.name} ({plan.width}x{plan.height}, {plan.frames} frame(s), {plan.guidance_mode}, {plan.steps} steps, {seconds:.1f} s)"
        kind = "image" if output.suffix == ".png" else "video"
        return DemoResult(output, sidecar_path(output), kind, job.prompt, status)
