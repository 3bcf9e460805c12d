"""Launching the demo: its flags, who may reach it, and serving on one GPU or from every rank of a torchrun group."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from bernini.batch import make_enhancer
from bernini.cli import BATCH_ONLY, hide_flags, refuse_batch_flags, runtime_from, settings_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.demo.page import build_app
from bernini.demo.service import DemoService, JobRunner
from bernini.driver import Session
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
from bernini.world import LoadFailure

if TYPE_CHECKING:
    from bernini.pipeline import ModelSources

log = logging.getLogger(__package__)  # "bernini.demo" for every module of the demo, as log lines always named it

LOCALHOST = "127.0.0.1"
PUBLIC_HOST = "0.0.0.0"
DEFAULT_SAVE_DIR = "outputs/gradio"


# ---------------------------------------------------------------- flags and access


def build_parser(prog: str = "gradio_demo.py") -> argparse.ArgumentParser:
    """The CLI's model, generation, prompt-enhancer, runtime and multi-GPU flags, plus the demo's own."""
    parser = multi_gpu_parser(prog)
    parser.description = "Serve Bernini-R in the browser (README.md, 'Gradio demo'). Binds 127.0.0.1 unless told otherwise."
    hide_flags(parser, BATCH_ONLY)
    d = parser.add_argument_group("demo")
    d.add_argument("--port", type=int, default=7860, help="TCP port of the page")
    d.add_argument("--listen", action="store_true", help=f"serve on {PUBLIC_HOST} (every interface), not {LOCALHOST}; needs --auth or --auth_file")
    d.add_argument("--share", action="store_true", help="also open a public gradio.live link; needs --auth or --auth_file")
    d.add_argument("--auth", metavar="USER:PASS", help="login for the page (required with --listen or --share)")
    d.add_argument("--auth_file", type=Path, help="file of USER:PASS lines ('#' comments); keeps passwords out of the process list")
    d.add_argument("--save_dir", type=Path, default=Path(DEFAULT_SAVE_DIR), help="results and their JSON sidecars; the only folder the server serves files from")
    d.add_argument("--queue_size", type=int, default=20, help="requests that may wait; more are refused until the queue drains")
    d.add_argument("--max_file_size", default="500mb", help="upload size cap, gradio syntax (500mb, 2gb)")
    d.add_argument("--lora_dir", type=Path, help="folder of .safetensors LoRAs the page offers (picking others loads the experts again)")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "gradio_demo.py") -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    refuse_batch_flags(parser, args, "in the demo the browser gives the task, prompt and media")
    return args


@dataclass(frozen=True)
class Access:
    """Who can reach the server: the bound address, the share link, and the logins."""

    host: str = LOCALHOST
    port: int = 7860
    share: bool = False
    auth: tuple[tuple[str, str], ...] = ()


def parse_login(text: str, where: str) -> tuple[str, str]:
    """'user:pass' -> (user, pass); the message never repeats the password."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: a login is USER:PASS with both parts non-empty")
    return user, password


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--auth_file {path} cannot be read ({exc.strerror or exc})") from None
    logins = [parse_login(line, f"--auth_file {path}:{n}") for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not logins:
        raise ValueError(f"--auth_file {path} holds no USER:PASS line")
    return logins


def access_from(args: argparse.Namespace) -> Access:
    """Refuse to expose the demo beyond this machine without a login; ValueError says what to add."""
    logins = ([parse_login(args.auth, "--auth")] if args.auth else []) + (read_auth_file(args.auth_file) if args.auth_file else [])
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not logins:
        flags = " and ".join(exposed)
        raise ValueError(
            f"{flags} would let anyone who reaches this machine (or the link) use the GPU without a login: "
            f"add --auth USER:PASS or --auth_file FILE, or drop {flags} to serve on {LOCALHOST} only"
        )
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    return Access(PUBLIC_HOST if args.listen else LOCALHOST, args.port, args.share, tuple(logins))


def launch_options(access: Access, save_dir: Path, max_file_size: str) -> dict[str, Any]:
    """Keyword arguments of gr.Blocks.launch: nothing public, served or phoning home unless asked."""
    return {
        "server_name": access.host,
        "server_port": access.port,
        "share": access.share,
        "auth": list(access.auth) or None,
        "allowed_paths": [str(save_dir.resolve())],  # besides gradio's own uploads, the only files served
        "max_file_size": max_file_size,
        "show_error": False,  # unexpected exceptions stay in the log; expected ones are gr.Error messages
        "quiet": True,  # the library logs the address itself
        "ssr_mode": False,
        "mcp_server": False,
        "enable_monitoring": False,
        "run_history": False,  # its page can push results to a remote bucket
    }


def start(app: gr.Blocks, access: Access, save_dir: Path, max_file_size: str = "500mb", queue_size: int = 20) -> str:
    """Queue (bounded, one render at a time) and serve without blocking; the local URL."""
    if queue_size < 1:
        raise ValueError(f"--queue_size {queue_size} is invalid: at least 1 request must be able to wait")
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    _, local_url, share_url = app.launch(prevent_thread_lock=True, **launch_options(access, save_dir, max_file_size))
    log.info("demo on %s%s; results in %s%s", local_url, f" and {share_url}" if share_url else "", save_dir, " (login required)" if access.auth else "")
    return local_url


# ---------------------------------------------------------------- entry


def base_settings(args: argparse.Namespace) -> GenerationSettings:
    """The launch flags as settings; the page's knobs start from these values."""
    return settings_from(args)


def serve_page(args: argparse.Namespace, access: Access, runner: JobRunner, switch_loras: Any = None) -> int:
    """Rank 0 (or the only process): the page, until interrupted."""
    save_dir = args.save_dir.resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    enhance = make_enhancer(args.pe_model, args.pe_on_error) if args.use_pe else None
    service = DemoService(runner, base_settings(args), save_dir, enhance, args.lora_dir, switch_loras)
    app = build_app(service, args.use_pe)
    try:
        start(app, access, save_dir, args.max_file_size, args.queue_size)
        app.block_thread()
    finally:
        runner.peers.send(None)  # release the other ranks
    return 0


def serve_single(args: argparse.Namespace, access: Access, sources: ModelSources, runtime: RuntimeConfig) -> int:
    from bernini.engine import Engine

    engine = Engine.from_sources(sources, runtime=runtime, settings=base_settings(args))
    runner = JobRunner(Session(engine), LocalPeers())

    def switch_loras(loras: tuple[Any, ...]) -> None:
        """The page picked other LoRAs: they are merged at load, so load again (checked first, the old models freed)."""
        from bernini import lora
        from bernini.pipeline import expert_configs
        from bernini.runner import release_memory

        lora.prepare(loras, expert_configs(sources))
        old_runtime = runner.session.engine.runtime
        new_runtime = dataclasses.replace(old_runtime, loras=loras)
        runner.session = None  # type: ignore[assignment]  # the old experts must be freed before the new ones load
        release_memory()
        try:
            fresh = Engine.from_sources(sources, runtime=new_runtime, settings=base_settings(args))
        except Exception:
            runner.session = Session(Engine.from_sources(sources, runtime=old_runtime, settings=base_settings(args)))  # back to the LoRAs it had
            raise
        runner.session = Session(fresh)

    del engine  # switch_loras must be able to free it
    return serve_page(args, access, runner, switch_loras)


def serve_group(args: argparse.Namespace, access: Access, sources: ModelSources, runtime: RuntimeConfig, env: LaunchEnv) -> int:
    """torchrun: every rank loads its part; rank 0 serves the page and shares each request."""
    topology = serving_topology(env, args.ulysses, args.cfg_parallel, sources, "the demo renders each request")
    with DistWorld.started(topology, env, device_for(args.device, env), args.dist_timeout) as world:
        try:
            engine = world.load(sources, runtime, base_settings(args), model_identity(sources), [])
        except LoadFailure as exc:  # on every rank: all of them heard of it
            log.error("the demo cannot start: %s", exc)
            return 2
        runner = JobRunner(Session(engine, world), DistPeers(world.groups))
        if topology.rank == 0:
            return serve_page(args, access, runner)
        runner.serve_peer()
        return 0


def main(argv: Sequence[str] | None = None, prog: str = "gradio_demo.py") -> int:
    args = parse_args(argv, prog)
    env = launch_env(args)
    if env is None:
        return 2
    from bernini.pipeline import resolve_sources

    try:  # identical on every rank: all stop here, before any collective or model load
        access = access_from(args)
        base_settings(args)
        runtime = runtime_from(args)
        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        if env.world_size > 1 or args.ulysses > 1 or args.cfg_parallel > 1:
            return serve_group(args, access, sources, runtime, env)
        return serve_single(args, access, sources, runtime)
    except (ValueError, OSError) as exc:  # weights that do not load, a port in use
        log.error("%s", exc)
        return 2
