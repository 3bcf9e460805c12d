"""What a batch writes and reads back: case records, sidecars, fingerprints, resume checks, summary.json and its tally."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bernini import __version__, media
from bernini.cases import Case
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.plan import CasePlan, format_plan, plan_all
from bernini.sampling import StepEvent

if TYPE_CHECKING:
    from bernini.pipeline import ModelSources, RenderOutput

if TYPE_CHECKING:
    from bernini.shard import ShardRun

log = logging.getLogger(__name__)

__all__ = [
    "BatchOptions", "CaseRecord", "LogProgress", "Progress", "exit_code", "fingerprint", "format_plan", "is_complete", "model_identity", "plan_all",
    "release_memory", "sidecar", "sidecar_path", "summary_location", "tally", "write_json_atomic", "write_summary",
]

SIDECAR_VERSION = 2
SUMMARY_VERSION = 1
VERSIONED_PACKAGES = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "av", "numpy")


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs: fail-fast, resume, where its summary goes, the runtime sidecars record."""

    fail_fast: bool = False
    skip_existing: bool = False
    summary: Path | None = None
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
        pass  # the driver logs the outcome and the phase timings whatever the progress display

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
    case: Case, settings: GenerationSettings, model_identity: dict[str, Any], prompt: str | None = None, dtype: str | None = None,
    loras: Sequence[Any] = (),
) -> str:
    """What makes an output what it is: case, media files, settings, model, dtype, LoRAs. Resume compares it."""
    payload = {
        "case": {k: v for k, v in case.to_dict().items() if k not in ("name", "source")},
        "prompt": prompt or case.prompt,
        "media": [_file_stamp(p) for p in case.media()],
        "settings": settings.to_dict(),
        "model": model_identity,
    }
    if dtype is not None:
        payload["dtype"] = dtype
    if loras:  # only when merged, so fingerprints of runs without LoRAs stay as they were
        payload["loras"] = [dataclasses.asdict(ref) for ref in loras]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_for(case: Case, settings: GenerationSettings, model_identity: dict[str, Any], runtime: RuntimeConfig | None) -> str:
    """The fingerprint a sidecar records and --skip-existing compares (the runtime's dtype is part of it)."""
    return fingerprint(case, settings, model_identity, dtype=runtime.dtype if runtime else None, loras=runtime.loras if runtime else ())


def model_identity(sources: ModelSources) -> dict[str, Any]:
    """Paths of config, base and experts, plus a cheap name/size/mtime fingerprint of the expert files."""
    from bernini import weights
    from bernini.pipeline import EXPERT_FOLDERS

    identity = sources.identity()
    paths = [ckpt or sources.base / EXPERT_FOLDERS[name] for name, ckpt in sources.expert_ckpts.items()]
    try:
        identity["files"] = weights.checkpoint_identity(paths)
    except (OSError, ValueError) as exc:  # a hub id that is not a local path: its id is the identity
        log.debug("no file fingerprint for the checkpoint: %s", exc)
    return identity


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


def sidecar(
    case: Case,
    plan: CasePlan,
    result: RenderOutput,
    settings: GenerationSettings,
    model_identity: dict[str, Any],
    runtime: RuntimeConfig | None,
    pe_info: dict[str, Any] | None,
    timings: dict[str, float],
    load_seconds: float | None,
) -> dict[str, Any]:
    """The JSON written beside an output: how it was made, and the fingerprint resume compares."""
    return {
        "sidecar_version": SIDECAR_VERSION,
        "created": _now(),
        "output": plan.output,
        "fingerprint": fingerprint_for(case, settings, model_identity, runtime),
        "case": case.to_dict(),
        "prompt_used": result.prompt_used,
        "prompt_enhancer": pe_info,
        "seed": settings.seed,
        "effective": {"task_type": plan.task_type, "guidance_mode": plan.guidance_mode, "width": plan.width, "height": plan.height,
                      "frames": plan.frames, "fps": plan.fps, "steps": plan.steps},
        "settings": settings.to_dict(),
        "plan": plan.to_dict(),
        "timings": dict(timings),
        "model_load_seconds": load_seconds,
        **result.info,  # guidance_per_expert, expert_steps, attention_backend, dtype, device
        "runtime": dataclasses.asdict(runtime) if runtime else None,
        "versions": versions(),
        "checkpoint": model_identity,
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


def counts_of(records: Sequence[CaseRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def tally(counts: dict[str, int]) -> str:
    """The end-of-run line: '8 ok, 0 failed, 0 skipped', then invalid and not-run cases when there are any."""
    words = [f"{counts.get(status, 0)} {status}" for status in ("ok", "failed", "skipped")]
    words += [f"{counts[status]} {status.replace('_', ' ')}" for status in ("invalid", "not_run") if counts.get(status)]
    return ", ".join(words)


def write_summary(path: Path, records: Sequence[CaseRecord], info: dict[str, Any], started: float, final: bool, code: int | None = None) -> None:
    """summary.json; ``code`` overrides the exit code the records give (an interrupted run)."""
    data = {
        "summary_version": SUMMARY_VERSION,
        "complete": final,
        **info,
        "finished": _now() if final else None,
        "seconds": round(time.perf_counter() - started, 3),
        "exit_code": (exit_code(records) if code is None else code) if final else None,
        "counts": counts_of(records),
        "cases": [r.to_dict() for r in records],
    }
    write_json_atomic(path, data)
