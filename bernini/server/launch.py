"""`bernini serve`: the flags, the checks before anything loads, and serving on one GPU or from rank 0 of a torchrun group."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bernini.cli import BATCH_ONLY, hide_flags, refuse_batch_flags, runtime_from, settings_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.parallel import (
    DistPeers,
    DistWorld,
    LaunchEnv,
    LocalPeers,
    device_for,
    serving_topology,
)
from bernini.parallel.runner import build_parser as multi_gpu_parser
from bernini.parallel.runner import launch_env
from bernini.runner import model_identity
from bernini.server.auth import LOCALHOST, TOKEN_ENV, Access, Limits, access_for
from bernini.server.folders import Redactor, ServerFolders
from bernini.server.render import JobRenderer
from bernini.server.store import JobStore
from bernini.world import LoadFailure

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "outputs/server"
DEFAULT_MODEL_NAME = "bernini-r"


def build_parser(prog: str = "bernini serve") -> argparse.ArgumentParser:
    """The CLI's model, generation, runtime and multi-GPU flags (the defaults of every job), plus the server's own."""
    parser = multi_gpu_parser(prog)
    parser.description = "Serve Bernini-R over HTTP as /v1/videos (README.md, 'Job server'). Binds 127.0.0.1 unless told otherwise."
    hide_flags(parser, BATCH_ONLY)
    s = parser.add_argument_group("job server")
    s.add_argument("--host", default=LOCALHOST, help=f"address to listen on; anything but {LOCALHOST}/localhost/::1 needs {TOKEN_ENV}")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data_dir", type=Path, default=Path(DEFAULT_DATA_DIR), help="the job table, uploads and outputs (with sidecars); survives restarts")
    s.add_argument("--max_upload_mb", type=float, default=500.0, help="largest request body (uploads included); bigger ones get HTTP 413")
    s.add_argument("--max_queue", type=int, default=100, help="jobs that may wait; more get HTTP 429 until the queue drains")
    s.add_argument("--model_name", default=DEFAULT_MODEL_NAME, help="the model name clients send and are shown")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "bernini serve") -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    refuse_batch_flags(parser, args, "a job server takes the task, prompt and media from each request")
    if args.use_pe:
        parser.error("--use_pe is not supported by the job server yet; enhance prompts first with `infer_single_gpu.py --use_pe --pe_only`")
    return args


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_queued=args.max_queue)


def bind(access: Access) -> socket.socket:
    """Take the port before the model loads, so a port in use fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in access.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((access.host, access.port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {access.host}:{access.port} ({exc.strerror or exc}); pick another --port or stop what uses it") from None
    return sock


def open_store(data_dir: Path) -> tuple[ServerFolders, JobStore]:
    try:
        folders = ServerFolders.create(data_dir)
    except OSError as exc:
        raise ValueError(f"--data_dir {data_dir} cannot be used ({exc.strerror or exc}); choose a writable folder") from None
    return folders, JobStore(folders.database)


def recover(store: JobStore, folders: ServerFolders) -> None:
    """After a crash: a render that was running runs again from the start; nothing it left is kept."""
    requeued = store.recover()
    for job_id in requeued:
        folders.remove_outputs(job_id)
    for job_id in store.deleted_ids():  # deleted while rendering when the server died
        folders.remove_job(job_id)
        store.purge(job_id)
    partials = folders.remove_partials()
    orphans = folders.orphans(store.ids())
    for folder in orphans:
        shutil.rmtree(folder, ignore_errors=True)
    if requeued or partials or orphans:
        log.info("recovered: %d interrupted job(s) queued again, %d partial file(s) and %d unqueued upload folder(s) removed", len(requeued), partials, len(orphans))


def serve(args: argparse.Namespace, access: Access, sock: socket.socket, renderer: JobRenderer, settings: GenerationSettings, sources: Any) -> int:
    """Rank 0 (or the only process): HTTP and the worker, until interrupted."""
    import uvicorn

    from bernini.server.app import create_app
    from bernini.server.jobs import JobService
    from bernini.server.worker import Worker

    logging.getLogger("python_multipart").setLevel(logging.WARNING)  # a line per upload chunk otherwise
    folders, store = open_store(args.data_dir)
    recover(store, folders)
    redact = Redactor(folders, [sources.config_dir, sources.base])
    worker = Worker(store, folders, renderer, redact)
    service = JobService(store, folders, settings, limits_from(args), args.model_name, redact, worker)
    app = create_app(service, access, renderer.device)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5))
    worker.start()
    log.info("serving /v1/videos on http://%s:%d%s; jobs in %s", access.host, access.port, " (bearer token required)" if access.token else "", folders.root)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        renderer.close()  # release the other ranks
    return 0


def serve_single(args: argparse.Namespace, access: Access, sock: socket.socket, sources: Any, runtime: RuntimeConfig, settings: GenerationSettings) -> int:
    from bernini.driver import Session
    from bernini.engine import Engine

    engine = Engine.from_sources(sources, runtime=runtime, settings=settings)
    return serve(args, access, sock, JobRenderer(Session(engine), LocalPeers()), settings, sources)


def serve_group(args: argparse.Namespace, access: Access, sources: Any, runtime: RuntimeConfig, settings: GenerationSettings, env: LaunchEnv) -> int:
    """torchrun: every rank loads its part; rank 0 serves HTTP and shares each job; the others render with it."""
    topology = serving_topology(env, args.ulysses, args.cfg_parallel, sources, "the job server renders each job")
    device = device_for(args.device, env)
    sock = bind(access) if topology.rank == 0 else None
    with DistWorld.started(topology, env, device, args.dist_timeout) as world:
        from bernini.driver import Session

        try:
            engine = world.load(sources, runtime, settings, model_identity(sources), [])
        except LoadFailure as exc:  # on every rank: all of them heard of it
            log.error("the job server cannot start: %s", exc)
            return 2
        renderer = JobRenderer(Session(engine, world), DistPeers(world.groups))
        if sock is not None:
            return serve(args, access, sock, renderer, settings, sources)
        renderer.serve_peer()
        return 0


def main(argv: Sequence[str] | None = None, prog: str = "bernini serve") -> int:
    args = parse_args(argv, prog)
    env = launch_env(args)  # logging for this rank
    if env is None:
        return 2
    from bernini.pipeline import resolve_sources

    try:  # identical on every rank: all stop here, before any collective or model load
        access = access_for(args.host, args.port, os.environ)
        limits_from(args)
        settings = settings_from(args)
        runtime = runtime_from(args)
        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
        if env.rank == 0:
            open_store(args.data_dir)  # a folder that cannot be written, or a table of another version, fails now
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        if env.world_size > 1 or args.ulysses > 1 or args.cfg_parallel > 1:
            return serve_group(args, access, sources, runtime, settings, env)
        return serve_single(args, access, bind(access), sources, runtime, settings)
    except (ValueError, OSError) as exc:  # weights that do not load, a port in use
        log.error("%s", exc)
        return 2
