"""The multi-GPU batch driver: rank 0 plans, every model group renders its share, rank 0 summarizes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bernini import memory
from bernini.cases import Case
from bernini.cli import build_parser as build_cli_parser
from bernini.cli import configure_logging, options_from, runtime_from
from bernini.config import RuntimeConfig
from bernini.parallel.batch import BatchPlan, assign_cases, plan_batch, replay, share_plan
from bernini.parallel.cfg import CfgCombos
from bernini.parallel.groups import Groups, LaunchEnv, Topology, build_topology, destroy_distributed, init_distributed
from bernini.parallel.status import CheckedRender, GroupStatus, StopFlag, describe
from bernini.parallel.ulysses import UlyssesSequence
from bernini.plan import CasePlan
from bernini.runner import BatchRunner, CaseRecord, LogProgress, exit_code, write_summary

log = logging.getLogger(__name__)

__all__ = ["assign_cases", "build_parser", "expert_heads", "install", "main"]

Share = tuple[list[tuple[int, CaseRecord]], float | None]  # (todo index, record) pairs and the load seconds


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = build_cli_parser(prog, multi_gpu=True)
    parser.add_argument("--dist_timeout", type=float, default=1800.0, help="seconds a rank waits for its model group in a collective (default 1800)")
    return parser


def expert_heads(sources: Any) -> int:
    """The experts' attention heads, read from their config.json before any model loads."""
    from bernini.models.transformer import TransformerConfig
    from bernini.pipeline import EXPERT_FOLDERS

    heads = set()
    for name in sources.renderer.experts:
        path = sources.base / EXPERT_FOLDERS[name] / "config.json"
        try:
            heads.add(TransformerConfig.from_dict(json.loads(path.read_text())).num_attention_heads)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} cannot be read ({exc}); the base model must provide the transformer config") from None
    if len(heads) != 1:
        raise ValueError(f"the experts disagree on num_attention_heads ({sorted(heads)}); Ulysses needs one head count")
    return heads.pop()


def device_for(name: str, env: LaunchEnv) -> torch.device:
    """cuda -> cuda:LOCAL_RANK; cpu -> cpu. A device index is the launcher's business, not a flag's."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"--device {name!r} is not accepted here: use cuda (each rank takes cuda:LOCAL_RANK) or cpu")
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device is available; run with --device cpu (slow, for tiny checkpoints) or on a GPU machine")
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {env.local_rank} has no GPU: this node shows {torch.cuda.device_count()}; launch at most that many processes per node")
    return torch.device("cuda", env.local_rank)


def setup(args: argparse.Namespace, env: LaunchEnv) -> tuple[Topology, Any, torch.device]:
    """Everything every rank validates before the first collective; ValueError names the rule."""
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout {args.dist_timeout} is invalid: it must be > 0 seconds")
    if args.dry_run or args.pe_only:  # no model loads: neither the checkpoint nor a GPU is needed
        return build_topology(env, args.ulysses, args.cfg_parallel, None), None, torch.device("cpu")
    from bernini.pipeline import resolve_sources

    sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
    topology = build_topology(env, args.ulysses, args.cfg_parallel, expert_heads(sources))
    return topology, sources, device_for(args.device, env)


def install(renderer: Any, topology: Topology, groups: Groups) -> None:
    """Make a loaded renderer one member of its model group: Ulysses attention, CFG placement, who decodes."""
    from bernini.pipeline import torch_dtype

    if groups.ulysses is not None:
        for model in renderer.experts.values():
            model.sequence = UlyssesSequence(groups.ulysses)
    renderer.combos = CfgCombos(topology.cfg, topology.cfg_index, groups.cfg, renderer.device, torch_dtype(renderer.runtime.dtype))
    renderer.decode_outputs = topology.is_leader


def member_workload(plans: Sequence[CasePlan], topology: Topology, batch_combos: bool) -> memory.Workload:
    """What one rank holds of the largest forward: CFG parallel splits the passes, Ulysses every sequence."""
    whole = memory.workload_of(plans, batch_combos)

    def shard(tokens: int) -> int:
        return -(-tokens // topology.ulysses)

    passes = max(-(-whole.tokens // topology.cfg), whole.unbatched_tokens)  # at least one whole pass per rank
    return dataclasses.replace(whole, tokens=shard(passes), single_tokens=shard(whole.unbatched_tokens))


def load_member(sources: Any, runtime: RuntimeConfig, topology: Topology, groups: Groups, workload: memory.Workload | None = None) -> tuple[Any, str | None]:
    """Load and install this rank's renderer; (renderer, None), or (None, the first failure) on every rank of the group.

    The group also agrees on batching: a rank whose memory plan runs the guidance passes one at a time makes
    the whole group do so, since Ulysses exchanges happen inside each forward and must pair up.
    """
    from bernini.pipeline import Renderer

    status = GroupStatus(groups.model, topology.model_size)
    renderer, error = None, None
    try:
        renderer = Renderer.load(sources, runtime, workload)
        install(renderer, topology, groups)
    except Exception as exc:  # every rank of the group must hear of it before any collective
        log.error("the models could not be loaded: %s", describe(exc), exc_info=not isinstance(exc, ValueError))
        error = describe(exc)
    failure = GroupStatus.first(status.errors(error))
    if failure is not None or renderer is None:
        return None, failure
    if status.any(not renderer.runtime.batch_combos):
        renderer.runtime = dataclasses.replace(renderer.runtime, batch_combos=False)
    return renderer, None


def not_run(item: tuple[Case, CasePlan], error: str) -> CaseRecord:
    case, plan = item
    return CaseRecord(case.name, case.source, "not_run", output=plan.output, error=error)


def render_share(args: argparse.Namespace, plan: BatchPlan, topology: Topology, groups: Groups, sources: Any, device: torch.device, host_ranks: int = 1) -> Share:
    """Load once and render this model group's cases with all its ranks."""
    mine = plan.shares[topology.dp_index]
    if not mine:
        return [], None
    status = GroupStatus(groups.model, topology.model_size)
    runtime: RuntimeConfig = dataclasses.replace(runtime_from(args), device=str(device), host_ranks=host_ranks)
    clock = time.perf_counter()
    workload = member_workload([plan.todo[i][1] for i in mine], topology, runtime.batch_combos)
    renderer, failure = load_member(sources, runtime, topology, groups, workload)
    if renderer is None:
        return [(i, not_run(plan.todo[i], f"models could not be loaded: {failure}")) for i in mine], None
    seconds = round(time.perf_counter() - clock, 3)
    options = dataclasses.replace(options_from(args, runtime), write_outputs=topology.is_leader)
    render = CheckedRender(renderer, status, writer=topology.is_leader)
    runner = BatchRunner(render, plan.settings, options, plan.identity, replay(plan), LogProgress(), seconds)
    return run_share(runner, plan, mine, status, args.fail_fast), seconds


def run_share(runner: BatchRunner, plan: BatchPlan, mine: list[int], status: GroupStatus, fail_fast: bool) -> list[tuple[int, CaseRecord]]:
    """The group's loop; with --fail-fast every group stops at its next case once any case failed."""
    stop = StopFlag() if fail_fast else None
    records: list[tuple[int, CaseRecord]] = []
    failed: str | None = None
    for n, index in enumerate(mine, 1):
        # Agreed by the whole group, so no rank starts a case its peers skip.
        if stop is not None and status.any(failed is not None or stop.is_raised()):
            why = f"after {failed} failed" if failed else "after a case of another model group failed"
            records += [(i, not_run(plan.todo[i], f"--fail-fast: not run {why}")) for i in mine[n - 1 :]]
            log.error("--fail-fast: model group stops %s", why)
            break
        case, case_plan = plan.todo[index]
        record = runner.run_case(n, len(mine), case, case_plan)
        records.append((index, record))
        if record.status == "failed" and stop is not None:
            failed = case.name
            stop.raise_flag()
    return records


def finish(plan: BatchPlan, share: Share, topology: Topology, groups: Groups, started: float) -> int:
    """Gather the group leaders' records on rank 0, write summary.json there; the exit code on every rank."""
    parts: list[Any] | None = [None] * topology.world_size if topology.rank == 0 else None
    dist.gather_object(share if topology.is_leader else ([], None), parts, dst=0, group=groups.control)
    code: list[int | None] = [None]
    if topology.rank == 0 and parts is not None:
        rendered = dict(pair for records, _ in parts for pair in records)
        ordered = plan.finished + [rendered.get(i) or not_run(item, "no model group reported this case") for i, item in enumerate(plan.todo)]
        loads = [seconds for _, seconds in parts if seconds is not None]
        info = {**plan.info, "timings": {"load": max(loads)} if loads else {}}
        assert plan.summary is not None
        write_summary(plan.summary, ordered, info, started, True)
        log.info("summary: %s", plan.summary, extra={"event": "summary", "output": str(plan.summary)})
        print(plan.summary)
        code[0] = exit_code(ordered)
    dist.broadcast_object_list(code, src=0, group=groups.control)
    return int(code[0] or 0)


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
    started = time.perf_counter()
    args = build_parser(prog).parse_args(argv)
    env = launch_env(args)
    if env is None:
        return 2
    try:
        topology, sources, device = setup(args, env)
    except ValueError as exc:  # identical on every rank: all of them stop here, before any collective
        log.error("%s", exc)
        return 2
    if topology.is_leader and not args.verbose:
        logging.getLogger().setLevel(logging.INFO)  # every model group's progress, not only rank 0's
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_distributed(topology, env, device, args.dist_timeout)
    try:
        plan = share_plan(lambda: plan_batch(args, topology, sources), topology, groups)
        if plan.exit_code is not None:
            return plan.exit_code
        share = render_share(args, plan, topology, groups, sources, device, env.local_world_size)
        return finish(plan, share, topology, groups, started)
    finally:
        destroy_distributed()
