"""One thread that renders queued jobs in order, reports their progress, and stops a deleted job at its next step."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from bernini import media
from bernini.config import GenerationSettings
from bernini.sampling import StepEvent
from bernini.server.folders import ServerFolders
from bernini.server.render import JobRenderer, Rendered, plan_job
from bernini.server.store import JobRow, JobStore

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # a new job wakes the worker at once; this bounds the wait when a wake-up is missed
RENDER_SHARE = 95  # progress while denoising runs; decode, write and thumbnail take it to 100


def settings_of(spec: dict[str, Any]) -> GenerationSettings:
    data = dict(spec["settings"])
    data["norm_threshold"] = tuple(data["norm_threshold"])  # JSON has no tuples
    return GenerationSettings(**data)


def case_of(spec: dict[str, Any], folders: ServerFolders) -> dict[str, Any]:
    """The stored case-file object with its media back as absolute paths (stored relative to the server's folder)."""
    case = dict(spec["case"])
    for key in ("video", "images"):
        if key in case:
            case[key] = [str(folders.absolute(p)) for p in case[key]]
    if "image" in case:
        case["image"] = str(folders.absolute(case["image"]))
    return case


def write_thumbnail(output: Path, target: Path) -> None:
    """The first frame as a JPEG, written atomically like every output."""
    frame = Image.open(output).convert("RGB") if output.suffix == ".png" else media.read_video_frames_rgb(output, [0])[0]
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        frame.save(tmp, format="JPEG", quality=90)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class Worker:
    """Claims the oldest queued job, renders it, records the outcome; a thread of its own."""

    def __init__(self, store: JobStore, folders: ServerFolders, renderer: JobRenderer, redact: Callable[[str], str]) -> None:
        self.store = store
        self.folders = folders
        self.renderer = renderer
        self.redact = redact
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bernini-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the current step; the job that was running is queued again (it reruns at the next start)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            row = self.store.claim()
            if row is None:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._run(row)
            except Exception:  # a bug must not kill the only worker; the job fails, the next one runs
                log.exception("job %s: unexpected error", row.id)
                self.folders.remove_outputs(row.id)
                self.store.fail(row.id, "server_error", "the server failed this job unexpectedly; see its log")

    def _run(self, row: JobRow) -> None:
        self.folders.remove_outputs(row.id)  # an earlier attempt's files (a crash mid-render) are never kept
        log.info("job %s: started (attempt %d)", row.id, row.attempts)
        started = time.perf_counter()
        try:
            job = plan_job(row.id, case_of(row.spec, self.folders), settings_of(row.spec), self.folders.videos)
        except ValueError as exc:  # its uploads no longer pass the checks they passed when it was queued
            self._finish(row, Rendered(False, str(exc), self.folders.videos), started)
            return
        progress = _ProgressWriter(self.store, row.id)
        result = self.renderer.render(job, progress, lambda: self._stopping.is_set() or self.store.is_deleted(row.id))
        self._finish(row, result, started)

    def _finish(self, row: JobRow, result: Rendered, started: float) -> None:
        seconds = time.perf_counter() - started
        if self.store.is_deleted(row.id):
            self.folders.remove_job(row.id)
            self.store.purge(row.id)
            log.info("job %s: deleted while rendering; stopped and removed", row.id)
            return
        if not result.ok and self._stopping.is_set():
            self.folders.remove_outputs(row.id)
            self.store.requeue(row.id)
            log.info("job %s: stopped by shutdown; queued again", row.id)
            return
        if result.ok:
            try:
                write_thumbnail(result.output, self.folders.thumbnail(row.id))
            except Exception as exc:  # the output verified when written; a thumbnail failure must not lose it
                log.warning("job %s: no thumbnail (%s: %s)", row.id, type(exc).__name__, exc)
            if self.store.complete(row.id, seconds):
                log.info("job %s: completed in %.2f s", row.id, seconds)
            else:  # deleted in the last moment
                self.folders.remove_job(row.id)
                self.store.purge(row.id)
            return
        self.folders.remove_outputs(row.id)
        self.store.fail(row.id, "render_failed", self.redact(result.error or "the render failed"))
        log.error("job %s: failed: %s", row.id, result.error)


class _ProgressWriter:
    """Step events -> the job's progress (0-95 while denoising), written when it moves."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.last = -1

    def __call__(self, event: StepEvent) -> None:
        progress = (event.index + 1) * RENDER_SHARE // event.total
        if progress != self.last:
            self.store.set_progress(self.job_id, progress)
            self.last = progress
