"""The job server: `/v1/videos` over HTTP (the openai SDK's `client.videos`), a durable SQLite queue, one model load.

Modules: folders (where files live, what a response may say about them), store (the job table), uploads
(request bodies streamed into the job's folder), fields (request fields -> a case and settings, checked like
a case file), jobs (the service the routes call), render (the one place a job is rendered), worker (the
thread that renders queued jobs), auth (who may call, and the limits), metrics, app (FastAPI routes) and
launch (`bernini serve`).
"""

from importlib import import_module
from typing import Any

# What callers outside the package use, and the module each lives in. Loaded on first use, so that
# `bernini serve`'s other ranks and its flag parsing import neither FastAPI nor the upload parser.
_EXPORTS = {
    "Access": "auth", "Limits": "auth", "access_for": "auth",
    "Redactor": "folders", "ServerFolders": "folders",
    "JobStore": "store",
    "JobService": "jobs",
    "JobRenderer": "render", "RenderJob": "render", "Rendered": "render",
    "Worker": "worker",
    "create_app": "app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"bernini.server.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'bernini.server' has no attribute {name!r}")
