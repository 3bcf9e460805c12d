"""What the routes call: check and queue a job, show it, list, serve its files, cancel and delete it, remix it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bernini.config import GenerationSettings
from bernini.plan import CasePlan
from bernini.server.auth import Limits
from bernini.server.fields import read_fields
from bernini.server.folders import JOB_ID, Redactor, ServerFolders
from bernini.server.render import output_suffix, plan_job
from bernini.server.store import IdempotencyConflict, JobRow, JobStore, NewJob, QueueFull
from bernini.server.uploads import Body
from bernini.server.worker import Worker, settings_of

CONTENT_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".jpg": "image/jpeg"}
VARIANTS = ("video", "thumbnail")


@dataclass
class ApiError(Exception):
    """An HTTP error in the openai shape: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(video_id: str) -> ApiError:
    return ApiError(404, f"no video {video_id!r} (it never existed here, or it was deleted)", code="video_not_found", param="video_id")


def param_of(message: str) -> str | None:
    """The key a case-file message names ("request: key 'video': ...")."""
    head = "request: key '"
    return message[len(head):].split("'", 1)[0] if message.startswith(head) else None


def seconds_of(plan: CasePlan) -> str:
    """Clip length as /v1/videos reports it: (frames - 1) / fps, the inverse of the seconds -> frames rule; '0' for an image."""
    return "0" if plan.frames == 1 else f"{(plan.frames - 1) / plan.fps:g}"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JobService:
    """The server's behaviour, independent of HTTP; every error is an ApiError with the status to answer."""

    def __init__(
        self, store: JobStore, folders: ServerFolders, settings: GenerationSettings, limits: Limits, model: str,
        redact: Redactor, worker: Worker | None = None,
    ) -> None:
        self.store = store
        self.folders = folders
        self.settings = settings
        self.limits = limits
        self.model = model
        self.redact = redact
        self.worker = worker  # None while nothing renders (tests queue jobs before a worker starts)

    @staticmethod
    def new_id() -> str:
        return f"video_{uuid.uuid4().hex}"

    # ------------------------------------------------------------ creating

    def submit(self, job_id: str, body: Body, idempotency_key: str | None = None) -> dict[str, Any]:
        """Check the request like a case file, then queue it; its uploads are already in the job's folder."""
        return self._queue(job_id, body, idempotency_key, self.settings, None, None)

    def remix(self, source_id: str, job_id: str, body: Body, idempotency_key: str | None = None) -> dict[str, Any]:
        """A new edit of a completed job's output with a new prompt: v2v for a video, i2i for an image (task_type may say otherwise)."""
        source = self._visible(source_id)
        if source.status != "completed":
            raise ApiError(400, f"video {source_id!r} is {source.status}; only a completed video can be remixed", code="video_not_ready", param="video_id")
        output = self.folders.output(source.id, source.spec["suffix"])
        folder = self.folders.upload_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / f"0-{source.id}{output.suffix}"
        try:
            os.link(output, copy)  # the remix keeps its source even if the original is deleted
        except OSError:
            shutil.copyfile(output, copy)
        image = output.suffix == ".png"
        defaults = {"task_type": "i2i", "image": str(copy)} if image else {"task_type": "v2v", "video": [str(copy)]}
        return self._queue(job_id, body, idempotency_key, settings_of(source.spec), defaults, source.id)

    def _queue(
        self, job_id: str, body: Body, key: str | None, base: GenerationSettings, defaults: dict[str, Any] | None, remixed_from: str | None
    ) -> dict[str, Any]:
        folder = self.folders.upload_dir(job_id)
        try:
            fields = read_fields(body, base, self.model, defaults)
            job = plan_job(job_id, fields.case, fields.settings, self.folders.videos)
        except ValueError as exc:  # CaseError included: the case-file message, with no server path in it
            shutil.rmtree(folder, ignore_errors=True)
            message = self.redact(str(exc))
            raise ApiError(400, message, code="invalid_request", param=param_of(message)) from None
        case = self._stored_case(fields.case)
        spec = {"case": case, "settings": fields.settings.to_dict(), "suffix": output_suffix(job.case)}
        info = {
            "model": self.model, "prompt": job.case.prompt, "task_type": job.case.task_type, "guidance_mode": job.plan.guidance_mode,
            "size": f"{job.plan.width}x{job.plan.height}", "seconds": seconds_of(job.plan), "content_type": CONTENT_TYPES[spec["suffix"]],
        }
        new = NewJob(job_id, spec, info, key, self._request_hash(case, spec, remixed_from) if key else None, remixed_from)
        try:
            row, created = self.store.insert(new, self.limits.max_queued)
        except QueueFull:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(429, f"the queue is full ({self.limits.max_queued} jobs waiting); retry later", code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": "30"}) from None
        except IdempotencyConflict:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(409, "this Idempotency-Key was used for a different request; use a new key for a new job",
                           code="idempotency_key_reused", param="Idempotency-Key", headers={"x-should-retry": "false"}) from None
        if not created:  # a retry: the first request's job, whatever it has become; this copy of the uploads goes
            shutil.rmtree(folder, ignore_errors=True)
        elif self.worker is not None:
            self.worker.wake()
        return video_json(row)

    def _stored_case(self, case: dict[str, Any]) -> dict[str, Any]:
        """Media paths relative to the server's folder (the folder may move between restarts)."""
        stored = dict(case)
        for key in ("video", "images"):
            if key in stored:
                stored[key] = [self.folders.relative(Path(p)) for p in stored[key]]
        if "image" in stored:
            stored["image"] = self.folders.relative(Path(stored["image"]))
        return stored

    def _request_hash(self, case: dict[str, Any], spec: dict[str, Any], remixed_from: str | None) -> str:
        """What makes two requests the same: fields, settings and the bytes of every upload (not where they were stored)."""
        media = {k: [file_digest(self.folders.absolute(p)) for p in (v if isinstance(v, list) else [v])] for k, v in case.items() if k in ("video", "image", "images")}
        fields = {k: v for k, v in case.items() if k not in media}
        payload = {"case": fields, "media": media, "settings": spec["settings"], "remixed_from": remixed_from}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ reading

    def _visible(self, video_id: str) -> JobRow:
        row = self.store.get(video_id) if JOB_ID.match(video_id) else None
        if row is None:
            raise not_found(video_id)
        return row

    def video(self, video_id: str) -> dict[str, Any]:
        return video_json(self._visible(video_id))

    def page(self, after: str | None, limit: int, order: str) -> dict[str, Any]:
        if not 1 <= limit <= self.limits.max_page:
            raise ApiError(400, f"limit must be 1 to {self.limits.max_page}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        found = self.store.page(after, limit, order)
        if found is None:
            raise ApiError(400, f"after: no video {after!r} to continue from", param="after")
        rows, more = found
        data = [video_json(r) for r in rows]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": more}

    def content(self, video_id: str, variant: str) -> tuple[Path, str]:
        """(file, media type) of a completed job: the mp4 (png for image tasks) or its first-frame jpg."""
        if variant not in VARIANTS:
            raise ApiError(400, f"variant {variant!r} is not available here; choose one of: {', '.join(VARIANTS)}", param="variant")
        row = self._visible(video_id)
        if row.status != "completed":  # a queued, running or failed job has no file to give, partial or not
            detail = f", {row.progress}%" if row.status == "in_progress" else ""
            raise ApiError(409, f"video {video_id!r} is {row.status}{detail}; its content exists once it is completed",
                           code="video_not_ready", param="video_id", headers={"x-should-retry": "false"})
        path = self.folders.thumbnail(row.id) if variant == "thumbnail" else self.folders.output(row.id, row.spec["suffix"])
        if not path.is_file():
            raise ApiError(404, f"the {variant} of video {video_id!r} is missing from the server's folder", code="content_missing")
        return path, CONTENT_TYPES[path.suffix]

    # ------------------------------------------------------------ deleting

    def delete(self, video_id: str) -> dict[str, Any]:
        """Cancel (a queued job never runs; a running one stops at its next step) and delete its files."""
        if not JOB_ID.match(video_id):
            raise not_found(video_id)
        before = self.store.mark_deleted(video_id)
        if before is None:
            raise not_found(video_id)
        if before != "in_progress":  # otherwise the worker removes the files once the render has stopped
            self.folders.remove_job(video_id)
            self.store.purge(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}


def video_json(row: JobRow) -> dict[str, Any]:
    """A job as the openai SDK's Video model reads it (plus Bernini's task_type, guidance_mode and content_type)."""
    info = row.info
    return {
        "id": row.id, "object": "video", "status": row.status, "progress": row.progress, "created_at": row.created_at,
        "completed_at": row.completed_at, "expires_at": None, "model": info["model"], "prompt": info["prompt"], "size": info["size"],
        "seconds": info["seconds"], "remixed_from_video_id": row.remixed_from, "error": row.error if row.status == "failed" else None,
        "task_type": info["task_type"], "guidance_mode": info["guidance_mode"], "content_type": info["content_type"],
    }
