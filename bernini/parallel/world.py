"""A torchrun launch as the batch driver's world: rank 0 plans, model groups render their shares, leaders report.

Also what a rank is built with: its placement in the group (Ulysses hooks, which guidance passes run
here, whether it decodes), agreed on before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from bernini.config import GenerationSettings, RuntimeConfig
from bernini.models import LocalSequence
from bernini.offload.sizes import Workload, workload_of
from bernini.parallel.cfg import CfgPasses
from bernini.parallel.groups import Groups, LaunchEnv, Topology, balance, build_topology, destroy_distributed, init_distributed
from bernini.parallel.status import GroupRender, GroupStatus, StopFlag
from bernini.parallel.ulysses import UlyssesSequence
from bernini.plan import CasePlan
from bernini.world import LoadFailure, Part, Planned, describe

if TYPE_CHECKING:
    from bernini.engine import Engine
    from bernini.pipeline import ModelSources, Placement, Renderer

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------- before the first collective


def expert_heads(sources: ModelSources) -> int:
    """The experts' attention heads, read from their config.json before any model loads."""
    from bernini.models import TransformerConfig
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


# ---------------------------------------------------------------- shares and placement


def serving_topology(env: LaunchEnv, ulysses: int, cfg_parallel: int, sources: ModelSources, renders: str) -> Topology:
    """One model group over every rank, for a long-lived server (the demo, the job server) that renders each request
    with all of them; ``renders`` starts the refusal ("the demo renders each request")."""
    topology = build_topology(env, ulysses, cfg_parallel, expert_heads(sources))
    if topology.dp != 1:
        raise ValueError(
            f"{renders} with every rank: launch --nproc-per-node {topology.model_size} "
            f"(--ulysses x --cfg_parallel = {ulysses} x {cfg_parallel}), not WORLD_SIZE {env.world_size}"
        )
    return topology


def assign_cases(plans: Sequence[CasePlan], groups: int) -> list[list[int]]:
    """Case indices of each model group: longest estimated cost first onto the least-loaded group."""
    placement = balance([p.cost for p in plans], groups)
    return [[i for i, g in enumerate(placement) if g == group] for group in range(groups)]


def format_shares(planned: Planned, topology: Topology) -> str:
    """The --dry-run lines that say which model group renders which cases."""
    lines = []
    for group, indices in enumerate(assign_cases([p for _, p in planned], topology.dp)):
        first = group * topology.model_size
        names = ", ".join(planned[i][0].name for i in indices) or "-"
        cost = sum(planned[i][1].cost for i in indices)
        lines.append(f"model group {group} (ranks {first}-{first + topology.model_size - 1}): cost {cost:.3g}: {names}")
    return "\n".join(lines)


def member_workload(plans: Sequence[CasePlan], topology: Topology, batch_passes: bool) -> Workload:
    """What one rank holds of the largest forward: CFG parallel splits the passes, Ulysses every sequence."""
    whole = workload_of(plans, batch_passes)

    def shard(tokens: int) -> int:
        return -(-tokens // topology.ulysses)

    passes = max(-(-whole.tokens // topology.cfg), whole.unbatched_tokens)  # at least one whole pass per rank
    return dataclasses.replace(whole, tokens=shard(passes), single_tokens=shard(whole.unbatched_tokens))


def placement_for(topology: Topology, groups: Groups, runtime: RuntimeConfig) -> Placement:
    """This rank's part of every case: Ulysses hooks over its group, its CFG share of the guidance passes, whether it decodes."""
    from bernini.pipeline import Placement, torch_dtype

    sequence = UlyssesSequence(groups.ulysses) if groups.ulysses is not None else LocalSequence()
    passes = CfgPasses(topology.cfg, topology.cfg_index, groups.cfg, torch.device(runtime.device), torch_dtype(runtime.dtype))
    return Placement(sequence, passes, decodes=topology.is_leader)


def load_member(sources: ModelSources, runtime: RuntimeConfig, topology: Topology, groups: Groups, workload: Workload | None = None) -> tuple[Renderer | None, str | None]:
    """This rank's renderer, built for its placement; (renderer, None), or (None, the first failure) on every rank of the group.

    The group agrees on batching before anything loads: a rank whose memory plan runs the guidance passes one at
    a time makes the whole group do so, since Ulysses exchanges happen inside each forward and must pair up.
    """
    from bernini.pipeline import Renderer, memory_plan_for

    status = GroupStatus(groups.model, topology.model_size)
    plan, error = None, None
    try:
        plan = memory_plan_for(sources, runtime, workload)
    except Exception as exc:  # every rank of the group must hear of it before any other collective
        error = _logged(exc)
    failure = GroupStatus.first(status.errors(error))
    if failure is None and plan is not None:
        if status.any(not plan.batch_passes):
            plan = dataclasses.replace(plan, batch_passes=False)
        renderer = None
        try:
            renderer = Renderer.load(sources, runtime, workload, placement=placement_for(topology, groups, runtime), memory_plan=plan)
        except Exception as exc:
            error = _logged(exc)
        failure = GroupStatus.first(status.errors(error))
        if failure is None:
            return renderer, None
    return None, failure


def _logged(exc: Exception) -> str:
    log.error("the models could not be loaded: %s", describe(exc), exc_info=not isinstance(exc, ValueError))
    return describe(exc)


# ---------------------------------------------------------------- the world


class _Raised:
    """An exception that travels to the other ranks of a group (by its text when it cannot be pickled)."""

    def __init__(self, exc: Exception) -> None:
        try:
            self.exc = pickle.loads(pickle.dumps(exc))
        except Exception:
            self.exc = RuntimeError(describe(exc))


class DistWorld:
    """The driver's collectives over torchrun's process groups (see bernini.driver.World)."""

    def __init__(self, topology: Topology, groups: Groups, device: torch.device, host_ranks: int = 1) -> None:
        self.topology = topology
        self.groups = groups
        self.device = device
        self.host_ranks = host_ranks  # processes sharing this host's RAM: each plans with its share
        self.status = GroupStatus(groups.model, topology.model_size)
        self._stop: StopFlag | None = None

    @classmethod
    @contextlib.contextmanager
    def started(cls, topology: Topology, env: LaunchEnv, device: torch.device, timeout: float) -> Iterator[DistWorld]:
        """This rank's device and torchrun's process groups, torn down on the way out (errors included)."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        groups = init_distributed(topology, env, device, timeout)
        try:
            yield cls(topology, groups, device, env.local_world_size)
        finally:
            destroy_distributed()

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def size(self) -> int:
        return self.topology.world_size

    @property
    def group(self) -> int:
        return self.topology.dp_index

    @property
    def writes(self) -> bool:
        return self.topology.is_leader

    def broadcast(self, value: T | None) -> T:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.groups.control)
        return box[0]  # type: ignore[return-value]

    def assign(self, plans: Sequence[CasePlan]) -> list[list[int]]:
        for plan in plans:
            if plan.forwards_per_step < self.topology.cfg:
                log.warning("%s: %d guidance pass(es) per step for --cfg_parallel %d; some CFG groups idle", plan.name, plan.forwards_per_step, self.topology.cfg)
        return assign_cases(plans, self.topology.dp)

    def agree(self, value: T | None) -> T | None:
        return self.status.agree(value)

    def from_leader(self, compute: Callable[[], T]) -> T:
        box: list[Any] = [None]
        if self.writes:
            try:
                box[0] = compute()
            except Exception as exc:
                box[0] = _Raised(exc)
        if self.topology.model_size > 1:
            leader = self.topology.rank_of(self.topology.dp_index, 0, 0)
            dist.broadcast_object_list(box, src=leader, group=self.groups.model)
        if isinstance(box[0], _Raised):
            raise box[0].exc
        return box[0]

    def _flag(self) -> StopFlag:
        if self._stop is None:
            self._stop = StopFlag()
        return self._stop

    def stop_all(self) -> None:
        self._flag().raise_flag()

    def stopped(self) -> bool:
        return self._flag().is_raised()

    def load(self, sources: ModelSources, runtime: RuntimeConfig, settings: GenerationSettings, identity: dict[str, Any], plans: Sequence[CasePlan]) -> Engine:
        from bernini.engine import Engine

        runtime = dataclasses.replace(runtime, device=str(self.device), host_ranks=self.host_ranks)
        workload = member_workload(plans, self.topology, runtime.batch_passes) if plans else None
        renderer, failure = load_member(sources, runtime, self.topology, self.groups, workload)
        if renderer is None:
            raise LoadFailure(failure)
        return Engine(renderer, sources, settings=settings, identity=identity, runtime=runtime, render=GroupRender(renderer, self.status))

    def gather(self, part: Part) -> list[Part] | None:
        parts: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(part, parts, dst=0, group=self.groups.control)
        return parts

    def run_info(self) -> dict[str, Any]:
        t = self.topology
        return {"parallel": {"world_size": t.world_size, "data_parallel": t.dp, "cfg_parallel": t.cfg, "ulysses": t.ulysses}}

    def describe_shares(self, planned: Planned) -> str | None:
        return format_shares(planned, self.topology)
