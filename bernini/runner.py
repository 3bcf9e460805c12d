"""Batch runs that never lose work: plan all cases, render each, write atomically, summarize, resume."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bernini import __version__, media
from bernini.cases import Case, CaseError
from bernini.config import GenerationSettings
from bernini.plan import CasePlan, plan_case
from bernini.sampling import NonFiniteError, StepEvent

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1


@dataclass(frozen=True)
class BatchOptions:
    dry_run: bool = False
    fail_fast: bool = False
    skip_existing: bool = False
    summary: Path | None = None
    write_outputs: bool = True  # False on ranks that only help (multi-GPU)


@dataclass
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
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}) or k in ("status", "error")}


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


def fingerprint(case: Case, settings: GenerationSettings, model_identity: dict[str, Any], prompt: str | None = None) -> str:
    """What makes an output what it is: case, media files, settings, model. Resume compares it."""
    payload = {
        "case": {k: v for k, v in case.to_dict().items() if k not in ("name", "source")},
        "prompt": prompt or case.prompt,
        "media": [_file_stamp(p) for p in case.media()],
        "settings": settings.to_dict(),
        "model": model_identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    found = {"bernini": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "av"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
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
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == expected and media.verify_media(out, plan.frames, plan.width, plan.height)


def plan_all(cases: Sequence[Case], settings: GenerationSettings, errors: list[tuple[str, str]]) -> list[tuple[Case, CasePlan]]:
    """Probe every case's media and check every output folder before any model loads."""
    planned = []
    for case in cases:
        try:
            plan = plan_case(case, settings)
            _check_writable(Path(plan.output), case)
            planned.append((case, plan))
        except CaseError as exc:
            errors.append((case.source, str(exc)))
    return planned


def _check_writable(output: Path, case: Case) -> None:
    folder = output.parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CaseError(f"{case.source}: key 'output': folder {folder} cannot be created or written; choose another --output_dir")


class BatchRunner:
    """Renders planned cases one by one; a failing case never stops the batch unless fail_fast."""

    def __init__(
        self,
        render: Callable[..., Any],
        settings: GenerationSettings,
        options: BatchOptions,
        model_identity: dict[str, Any],
        enhance: Callable[[Case], tuple[str, dict[str, Any] | None]] | None = None,
    ):
        self.render = render
        self.settings = settings
        self.options = options
        self.model_identity = model_identity
        self.enhance = enhance

    def run_case(self, index: int, total: int, case: Case, plan: CasePlan) -> CaseRecord:
        record = CaseRecord(case.name, case.source, "failed", output=plan.output, plan=plan.to_dict())
        started = time.perf_counter()
        try:
            prompt, pe_info = self.enhance(case) if self.enhance else (case.prompt, None)
            result = self.render(case, self.settings, plan=plan, prompt=prompt, on_step=_progress(index, total, case))
            if result is None:  # a helper rank: the writer reports
                record.status = "ok"
                return record
            record.timings = dict(result.timings)
            if self.options.write_outputs:
                clock = time.perf_counter()
                media.write_media(result.frames, Path(plan.output), plan.fps)
                record.timings["write"] = time.perf_counter() - clock
                record.timings["total"] = time.perf_counter() - started
                write_json_atomic(sidecar_path(Path(plan.output)), self._sidecar(case, plan, result, prompt, pe_info, record.timings))
            record.status = "ok"
            log.info("[%d/%d] %s: ok -> %s (%.1f s)", index, total, case.name, plan.output, time.perf_counter() - started)
        except (CaseError, media.MediaError, NonFiniteError) as exc:
            record.error = str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            record.error = f"out of GPU memory ({exc}); lower --max_image_size/--num_frames or use --offload"
        except Exception as exc:  # keep the batch going; the summary names the failure
            log.exception("%s failed", case.name)
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.timings.setdefault("total", time.perf_counter() - started)
        if record.status != "ok":
            log.error("[%d/%d] %s: FAILED: %s", index, total, case.name, record.error)
            release_memory()
        return record

    def _sidecar(self, case, plan, result, prompt, pe_info, timings) -> dict[str, Any]:
        return {
            "sidecar_version": SIDECAR_VERSION,
            "fingerprint": fingerprint(case, self.settings, self.model_identity, case.prompt),
            "case": case.to_dict(),
            "plan": plan.to_dict(),
            "seed": self.settings.seed,
            "settings": self.settings.to_dict(),
            "prompt_used": result.prompt_used,
            "prompt_enhancer": pe_info,
            "timings": timings,
            **result.info,
            "versions": versions(),
            "checkpoint": self.model_identity,
        }


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(index: int, total: int, case: Case) -> Callable[[StepEvent], None]:
    done: list[float] = []

    def on_step(event: StepEvent) -> None:
        done.append(event.seconds)
        mean = sum(done) / len(done)
        eta = mean * (event.total - event.index - 1)
        log.info(
            "[%d/%d] %s step %d/%d %s %.2f s/step ETA %.0f s",
            index, total, case.name, event.index + 1, event.total, event.expert, mean, eta,
            extra={"event": "step", "case": case.name, "step": event.index + 1, "steps": event.total, "expert": event.expert, "eta_s": round(eta, 1)},
        )

    return on_step


def summary_location(plans: Sequence[CasePlan], explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    folders = [str(Path(p.output).parent) for p in plans] or [str(Path("outputs").resolve())]
    return Path(os.path.commonpath(folders)) / "summary.json"


def write_summary(path: Path, records: Sequence[CaseRecord], started: float) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    write_json_atomic(path, {"counts": counts, "seconds": round(time.perf_counter() - started, 3), "cases": [r.to_dict() for r in records]})


def exit_code(records: Sequence[CaseRecord]) -> int:
    """0: everything ok (or skipped); 1: some failed; 2: nothing could run."""
    good = sum(r.status in ("ok", "skipped") for r in records)
    if good == len(records) and records:
        return 0
    return 1 if good else 2


def format_plan(planned: Sequence[tuple[Case, CasePlan]], errors: Sequence[tuple[str, str]]) -> str:
    """The --dry-run table: per case task, mode, size, frames, fps, forwards per step, output."""
    lines = [f"{'case':24} {'task':6} {'mode':9} {'size':>9} {'frames':>6} {'fps':>5} {'fwd/step':>8} {'tokens':>8}  output"]
    for case, p in planned:
        lines.append(
            f"{case.name[:24]:24} {p.task_type:6} {p.guidance_mode:9} {p.width:>4}x{p.height:<4} {p.frames:>6} "
            f"{p.fps:>5g} {p.forwards_per_step:>8} {max(p.tokens_per_forward):>8}  {p.output}"
        )
    lines += [f"INVALID {source}: {message}" for source, message in errors]
    lines.append(f"{len(planned)} case(s) ready, {len(errors)} invalid")
    return "\n".join(lines)


def run_batch(
    planned: Sequence[tuple[Case, CasePlan]],
    errors: Sequence[tuple[str, str]],
    settings: GenerationSettings,
    options: BatchOptions,
    model_identity: dict[str, Any],
    load_render: Callable[[], Callable[..., Any]],
    enhance: Callable[[Case], tuple[str, dict[str, Any] | None]] | None = None,
) -> int:
    """Run a validated batch: skip complete outputs, load models once, render, summarize. Exit code."""
    started = time.perf_counter()
    records = [CaseRecord(source, source, "invalid", error=message) for source, message in errors]
    summary = summary_location([p for _, p in planned], options.summary)
    todo: list[tuple[Case, CasePlan]] = []
    for case, plan in planned:
        if options.skip_existing and is_complete(case, plan, fingerprint(case, settings, model_identity)):
            log.info("%s: complete output %s found; skipped", case.name, plan.output)
            records.append(CaseRecord(case.name, case.source, "skipped", output=plan.output))
        else:
            todo.append((case, plan))
    if todo:
        runner = BatchRunner(load_render(), settings, options, model_identity, enhance)
        for i, (case, plan) in enumerate(todo, 1):
            record = runner.run_case(i, len(todo), case, plan)
            records.append(record)
            if options.write_outputs:
                write_summary(summary, records, started)
            if record.status == "failed" and options.fail_fast:
                records += [CaseRecord(c.name, c.source, "not_run", output=p.output) for c, p in todo[i:]]
                log.error("--fail-fast: stopping after %s", case.name)
                break
    if options.write_outputs:
        write_summary(summary, records, started)
        log.info("summary: %s", summary)
    return exit_code(records)
