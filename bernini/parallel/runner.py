"""The torchrun entry: the single-GPU flags plus the parallel degrees; validates on every rank, then runs the driver on the world."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bernini import driver
from bernini.cli import build_parser as build_cli_parser
from bernini.cli import configure_logging
from bernini.main import report, request_from
from bernini.parallel.groups import LaunchEnv, Topology, build_topology
from bernini.parallel.world import DistWorld, device_for, expert_heads
from bernini.runner import LogProgress

if TYPE_CHECKING:
    from bernini.pipeline import ModelSources

log = logging.getLogger(__name__)

__all__ = ["build_parser", "launch_env", "main", "setup"]


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = build_cli_parser(prog, multi_gpu=True)
    parser.add_argument("--dist_timeout", type=float, default=1800.0, help="seconds a rank waits for its model group in a collective (default 1800)")
    return parser


def setup(args: argparse.Namespace, env: LaunchEnv) -> tuple[Topology, ModelSources | None, torch.device]:
    """Everything every rank validates before the first collective; ValueError names the rule."""
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout {args.dist_timeout} is invalid: it must be > 0 seconds")
    if args.dry_run or args.pe_only:  # no model loads: neither the checkpoint nor a GPU is needed
        return build_topology(env, args.ulysses, args.cfg_parallel, None), None, torch.device("cpu")
    from bernini.pipeline import resolve_sources

    sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
    topology = build_topology(env, args.ulysses, args.cfg_parallel, expert_heads(sources))
    return topology, sources, device_for(args.device, env)


def launch_env(args: argparse.Namespace) -> LaunchEnv | None:
    """torchrun's environment, with logging set up for this rank; None (logged) when it is inconsistent."""
    try:
        env = LaunchEnv.from_environ()
    except ValueError as exc:
        configure_logging(args.log_format, args.verbose)
        log.error("%s", exc)
        return None
    configure_logging(args.log_format, args.verbose, env.rank)
    return env


def main(argv: Sequence[str] | None = None, prog: str = "infer_multi_gpu.py") -> int:
    """The torchrun entry: same flags and case files as infer_single_gpu.py, plus the parallel degrees."""
    args = build_parser(prog).parse_args(argv)
    env = launch_env(args)
    if env is None:
        return 2
    try:
        request = request_from(args)
        topology, sources, device = setup(args, env)
    except ValueError as exc:  # identical on every rank: all of them stop here, before any collective
        log.error("%s", exc)
        return 2
    if topology.is_leader and not args.verbose:
        logging.getLogger().setLevel(logging.INFO)  # every model group's progress, not only rank 0's
    with DistWorld.started(topology, env, device, args.dist_timeout) as world:
        outcome = driver.run(request, world, progress=LogProgress(), sources=sources)
    if topology.rank == 0:
        report(outcome, args.log_format)
    return outcome.exit_code
