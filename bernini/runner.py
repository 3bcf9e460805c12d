"""Batch runs that never lose work: render each planned case, write atomically, summarize, resume."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bernini import __version__, media
from bernini.cases import Case, CaseError
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.plan import CasePlan, format_plan, plan_all
from bernini.sampling import NonFiniteError, StepEvent

if TYPE_CHECKING:
    from bernini.shard import ShardRun

log = logging.getLogger(__name__)

__all__ = ["BatchOptions", "CaseRecord", "LogProgress", "Progress", "fingerprint", "format_plan", "plan_all", "run_batch", "sidecar_path", "summary_location", "write_json_atomic"]

SIDECAR_VERSION = 2
SUMMARY_VERSION = 1
VERSIONED_PACKAGES = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "av", "numpy")

Enhance = Callable[[Case], tuple[str, dict[str, Any] | None]]


@dataclass(frozen=True)
class BatchOptions:
    dry_run: bool = False
    fail_fast: bool = False
    skip_existing: bool = False
    summary: Path | None = None
    write_outputs: bool = True  # False on ranks that only help (multi-GPU)
    output_dir: Path | None = None  # summary.json goes here when no case plans an output
    runtime: RuntimeConfig | None = None  # recorded in sidecars; its dtype is part of the fingerprint
    shard: ShardRun | None = None  # one job's share of a batch split across jobs (bernini/shard.py): claims each case


@dataclass(frozen=True)
class CaseRecord:
    """One line of summary.json."""

    name: str
    source: str
    status: str  # ok | failed | skipped | invalid | not_run
    output: str | None = None
    error: str | None = None
    plan: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {}) or k in ("status", "error")}


class Progress(Protocol):
    """Where per-case and per-step progress goes: log lines, or bars on a terminal (cli.py)."""

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None: ...

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None: ...

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None: ...

    def close(self) -> None: ...


class LogProgress:
    """Progress as log lines; step lines carry case/step/expert fields for --log-format json."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None:
        self.seconds = []
        log.info("[%d/%d] %s: %s (%s) %dx%d, %d frame(s) at %g fps, %d step(s) -> %s", index, total, case.name, plan.task_type, plan.guidance_mode,
                 plan.width, plan.height, plan.frames, plan.fps, plan.steps, plan.output, extra={"event": "case_start", "case": case.name, "index": index, "total": total})

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None:
        self.seconds.append(event.seconds)
        mean = sum(self.seconds) / len(self.seconds)
        eta = mean * (event.total - event.index - 1)
        log.info(
            "[%d/%d] %s step %d/%d %s %.2f s/step ETA %.0f s",
            index, total, case.name, event.index + 1, event.total, event.expert, mean, eta,
            extra={"event": "step", "case": case.name, "step": event.index + 1, "steps": event.total, "expert": event.expert, "s_per_step": round(mean, 4), "eta_s": round(eta, 1)},
        )

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None:
        pass  # run_case logs the outcome and the phase timings whatever the progress display

    def close(self) -> None:
        pass


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(
    case: Case, settings: GenerationSettings, model_identity: dict[str, Any], prompt: str | None = None, dtype: str | None = None
) -> str:
    """What makes an output what it is: case, media files, settings, model, dtype. Resume compares it."""
    payload = {
        "case": {k: v for k, v in case.to_dict().items() if k not in ("name", "source")},
        "prompt": prompt or case.prompt,
        "media": [_file_stamp(p) for p in case.media()],
        "settings": settings.to_dict(),
        "model": model_identity,
    }
    if dtype is not None:
        payload["dtype"] = dtype
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    found = {"bernini": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def is_complete(case: Case, plan: CasePlan, expected: str) -> bool:
    """--skip-existing: the output is whole and its sidecar says it came from this very case."""
    out = Path(plan.output)
    side = sidecar_path(out)
    if not (out.is_file() and side.is_file()):
        return False
    try:
        recorded = json.loads(side.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return False
    if recorded != expected:
        log.info("%s: %s was made from other inputs or settings; redoing it", case.name, out)
        return False
    if not media.verify_media(out, plan.frames, plan.width, plan.height):
        log.info("%s: %s is incomplete or unreadable; redoing it", case.name, out)
        return False
    return True


class BatchRunner:
    """Renders planned cases one by one; a failing case never stops the batch unless fail_fast."""

    def __init__(
        self,
        render: Callable[..., Any],
        settings: GenerationSettings,
        options: BatchOptions,
        model_identity: dict[str, Any],
        enhance: Enhance | None = None,
        progress: Progress | None = None,
        load_seconds: float | None = None,
    ) -> None:
        self.render = render
        self.settings = settings
        self.options = options
        self.model_identity = model_identity
        self.enhance = enhance
        self.progress = progress or LogProgress()
        self.load_seconds = load_seconds

    def fingerprint(self, case: Case) -> str:
        runtime = self.options.runtime
        return fingerprint(case, self.settings, self.model_identity, dtype=runtime.dtype if runtime else None)

    def run_case(self, index: int, total: int, case: Case, plan: CasePlan) -> CaseRecord:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        status, error = "failed", None
        self.progress.case_started(index, total, case, plan)
        try:
            status = self._render_and_write(index, total, case, plan, timings)
        except (CaseError, media.MediaError, NonFiniteError) as exc:
            error = str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            error = f"out of GPU memory ({str(exc).splitlines()[0] if str(exc) else 'no detail'}); lower --max_image_size/--num_frames or use --offload expert|block"
        except Exception as exc:  # keep the batch going; the summary names the failure
            log.exception("%s failed", case.name)
            error = f"{type(exc).__name__}: {exc}"
        timings["total"] = time.perf_counter() - started
        record = CaseRecord(case.name, case.source, status, output=plan.output, error=error, plan=plan.to_dict(), timings=timings)
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        extra = {"event": "case_end", "case": case.name, "status": status, "output": plan.output, "timings": timings}
        if status == "ok":
            log.info("[%d/%d] %s: ok -> %s (%s)", index, total, case.name, plan.output, phases, extra=extra)
        else:
            log.error("[%d/%d] %s: FAILED: %s (%s)", index, total, case.name, error, phases, extra=extra)
            release_memory()
        self.progress.case_finished(index, total, record)
        return record

    def _render_and_write(self, index: int, total: int, case: Case, plan: CasePlan, timings: dict[str, float]) -> str:
        started = clock = time.perf_counter()
        prompt, pe_info = self.enhance(case) if self.enhance else (case.prompt, None)
        if self.enhance:
            timings["prompt_enhance"] = time.perf_counter() - clock

        def on_step(event: StepEvent) -> None:
            self.progress.step(index, total, case, event)

        result = self.render(case, self.settings, plan=plan, prompt=prompt, on_step=on_step)
        if result is None:  # a helper rank: the writer reports
            return "ok"
        timings.update(result.timings)
        if self.options.write_outputs:
            clock = time.perf_counter()
            media.write_media(result.frames, Path(plan.output), plan.fps)
            timings["write"] = time.perf_counter() - clock
            timings["total"] = time.perf_counter() - started  # the summary's total adds only bookkeeping
            write_json_atomic(sidecar_path(Path(plan.output)), self._sidecar(case, plan, result, pe_info, timings))
        return "ok"

    def _sidecar(self, case: Case, plan: CasePlan, result: Any, pe_info: dict[str, Any] | None, timings: dict[str, float]) -> dict[str, Any]:
        runtime = self.options.runtime
        return {
            "sidecar_version": SIDECAR_VERSION,
            "created": _now(),
            "output": plan.output,
            "fingerprint": self.fingerprint(case),
            "case": case.to_dict(),
            "prompt_used": result.prompt_used,
            "prompt_enhancer": pe_info,
            "seed": self.settings.seed,
            "effective": {"task_type": plan.task_type, "guidance_mode": plan.guidance_mode, "width": plan.width, "height": plan.height,
                          "frames": plan.frames, "fps": plan.fps, "steps": plan.steps},
            "settings": self.settings.to_dict(),
            "plan": plan.to_dict(),
            "timings": dict(timings),
            "model_load_seconds": self.load_seconds,
            **result.info,  # guidance_per_expert, expert_steps, attention_backend, dtype, device
            "runtime": dataclasses.asdict(runtime) if runtime else None,
            "versions": versions(),
            "checkpoint": self.model_identity,
        }


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def summary_location(plans: Sequence[CasePlan], explicit: Path | None, fallback: Path | None = None) -> Path:
    """--summary, else the common folder of the outputs (the first output's folder if that is '/')."""
    if explicit is not None:
        return Path(explicit)
    folders = [str(Path(p.output).parent) for p in plans]
    if not folders:
        return (fallback or Path("outputs")).resolve() / "summary.json"
    common = Path(os.path.commonpath(folders))
    return (common if common.parent != common else Path(folders[0])) / "summary.json"


def exit_code(records: Sequence[CaseRecord]) -> int:
    """0: every case ok (or skipped; an empty shard has nothing to fail); 2: no case could run; 1: anything in between."""
    good = sum(r.status in ("ok", "skipped") for r in records)
    if good == len(records):
        return 0
    ran = good + sum(r.status == "failed" for r in records)
    return 1 if ran else 2


def write_summary(path: Path, records: Sequence[CaseRecord], info: dict[str, Any], started: float, final: bool) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    data = {
        "summary_version": SUMMARY_VERSION,
        "complete": final,
        **info,
        "finished": _now() if final else None,
        "seconds": round(time.perf_counter() - started, 3),
        "exit_code": exit_code(records) if final else None,
        "counts": counts,
        "cases": [r.to_dict() for r in records],
    }
    write_json_atomic(path, data)


def _resume(
    planned: Sequence[tuple[Case, CasePlan]], runner_fingerprint: Callable[[Case], str], skip_existing: bool
) -> tuple[list[tuple[Case, CasePlan]], list[CaseRecord]]:
    todo, skipped = [], []
    for case, plan in planned:
        if skip_existing and is_complete(case, plan, runner_fingerprint(case)):
            log.info("%s: complete output %s found; skipped", case.name, plan.output)
            skipped.append(CaseRecord(case.name, case.source, "skipped", output=plan.output))
        else:
            todo.append((case, plan))
    return todo, skipped


def _not_run(todo: Sequence[tuple[Case, CasePlan]], error: str | None = None) -> list[CaseRecord]:
    return [CaseRecord(c.name, c.source, "not_run", output=p.output, error=error) for c, p in todo]


def run_batch(
    planned: Sequence[tuple[Case, CasePlan]],
    errors: Sequence[tuple[str, str]],
    settings: GenerationSettings,
    options: BatchOptions,
    model_identity: dict[str, Any],
    load_render: Callable[[], Callable[..., Any]],
    enhance: Enhance | None = None,
    progress: Progress | None = None,
) -> int:
    """Run a validated batch: skip complete outputs, load models once, render, summarize. Exit code."""
    started = time.perf_counter()
    info: dict[str, Any] = {"started": _now(), "timings": {}, "settings": settings.to_dict()}
    if options.runtime is not None:
        info["runtime"] = dataclasses.asdict(options.runtime)
    if options.shard is not None:
        info["shard"] = options.shard.info()
    records = [CaseRecord(source, source, "invalid", error=message) for source, message in errors]
    summary = summary_location([p for _, p in planned], options.summary, options.output_dir)
    runner = BatchRunner(lambda *a, **k: None, settings, options, model_identity, enhance, progress)
    todo, skipped = _resume(planned, runner.fingerprint, options.skip_existing)
    records += skipped

    def save(final: bool) -> None:
        if options.write_outputs:
            write_summary(summary, records, info, started, final)

    try:
        if todo:
            _render_all(runner, todo, load_render, info, records, save, options.fail_fast)
    except KeyboardInterrupt:
        done = {r.name for r in records}
        records += _not_run([(c, p) for c, p in todo if c.name not in done], "interrupted")
        save(True)
        raise
    finally:
        runner.progress.close()
    save(True)
    if options.write_outputs:
        log.info("summary: %s", summary, extra={"event": "summary", "output": str(summary)})
    return exit_code(records)


def _render_all(
    runner: BatchRunner,
    todo: Sequence[tuple[Case, CasePlan]],
    load_render: Callable[[], Callable[..., Any]],
    info: dict[str, Any],
    records: list[CaseRecord],
    save: Callable[[bool], None],
    fail_fast: bool,
) -> None:
    """Load once, then render into `records`; a model that cannot load leaves every case not_run."""
    clock = time.perf_counter()
    try:
        runner.render = load_render()
    except Exception as exc:
        log.error("the models could not be loaded: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, ValueError))
        records += _not_run(todo, f"models could not be loaded: {type(exc).__name__}: {exc}")
        return
    runner.load_seconds = info["timings"]["load"] = round(time.perf_counter() - clock, 3)
    log.info("load: %.2f s", runner.load_seconds, extra={"event": "load", "seconds": runner.load_seconds})
    shard = runner.options.shard
    for i, (case, plan) in enumerate(todo, 1):
        if shard is None:
            record = runner.run_case(i, len(todo), case, plan)
        else:  # under the case's claim, so two jobs sharing the batch never render it twice
            record = shard.run(case, plan, lambda: runner.run_case(i, len(todo), case, plan), lambda: is_complete(case, plan, runner.fingerprint(case)))
        records.append(record)
        save(False)
        if record.status == "failed" and fail_fast:
            records += _not_run(todo[i:], f"--fail-fast: not run after {case.name} failed")
            log.error("--fail-fast: stopping after %s", case.name)
            break
