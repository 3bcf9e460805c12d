"""The HTTP surface: /v1/videos as the openai SDK calls it, /health and /metrics; errors in the openai JSON shape."""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bernini.server.auth import Access
from bernini.server.jobs import ApiError, JobService
from bernini.server.metrics import CONTENT_TYPE, render_metrics
from bernini.server.uploads import BadBody, Body, BodyTooLarge, read_body

log = logging.getLogger(__name__)


def create_app(service: JobService, access: Access, device: torch.device | None = None) -> FastAPI:
    """The FastAPI app over a JobService; every route but /health checks the bearer token when one is set."""
    app = FastAPI(title="bernini job server", docs_url=None, redoc_url=None, openapi_url=None)  # no unauthenticated pages

    def authorized(authorization: str | None = Header(default=None)) -> None:
        if not access.allows(authorization):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <BERNINI_API_TOKEN>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        error = ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}", param=where)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)  # the detail stays in the log: it may name server paths
        return JSONResponse(ApiError(500, "internal server error; see the server log", type="server_error").body(), status_code=500)

    async def body_of(request: Request, job_id: str) -> Body:
        folder = service.folders.upload_dir(job_id)
        try:
            return await read_body(request.headers.get("content-type", ""), request.headers.get("content-length"), request.stream(), folder,
                                   service.limits.max_upload_bytes)
        except BodyTooLarge:
            shutil.rmtree(folder, ignore_errors=True)
            mib = service.limits.max_upload_bytes / 2**20
            raise ApiError(413, f"the request is over the {mib:g} MiB upload limit (--max_upload_mb)", code="upload_too_large",
                           headers={"Connection": "close"}) from None
        except BadBody as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(exc.status, service.redact(str(exc)), code="invalid_body") from None
        except BaseException:  # the client went away mid-upload, or a bug: its files go
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if service.worker is None or service.worker.alive else "worker_stopped"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> PlainTextResponse:
        alive = service.worker is not None and service.worker.alive
        text = await run_in_threadpool(render_metrics, service.store, device, alive)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.post("/v1/videos", dependencies=guarded)
    async def create(request: Request, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        job_id = service.new_id()
        body = await body_of(request, job_id)
        return await run_in_threadpool(service.submit, job_id, body, idempotency_key)

    @app.get("/v1/videos", dependencies=guarded)
    async def list_videos(after: str | None = None, limit: int = Query(20), order: str = "desc") -> dict[str, Any]:
        return await run_in_threadpool(service.page, after, limit, order)

    @app.get("/v1/videos/{video_id}", dependencies=guarded)
    async def retrieve(video_id: str) -> dict[str, Any]:
        return await run_in_threadpool(service.video, video_id)

    @app.get("/v1/videos/{video_id}/content", dependencies=guarded)
    async def content(video_id: str, variant: str = "video") -> FileResponse:
        path, media_type = await run_in_threadpool(service.content, video_id, variant)
        return FileResponse(path, media_type=media_type, filename=f"{video_id}{path.suffix}")

    @app.delete("/v1/videos/{video_id}", dependencies=guarded)
    async def delete(video_id: str) -> dict[str, Any]:
        return await run_in_threadpool(service.delete, video_id)

    @app.post("/v1/videos/{video_id}/remix", dependencies=guarded)
    async def remix(video_id: str, request: Request, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        job_id = service.new_id()
        body = await body_of(request, job_id)
        return await run_in_threadpool(service.remix, video_id, job_id, body, idempotency_key)

    return app
