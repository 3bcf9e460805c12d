"""Rank topology (data x CFG x Ulysses), its validation, and the process groups built from it."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells a process; a plain `python` launch is one process on one node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    torchrun: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "LaunchEnv":
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local_rank = int(environ.get("LOCAL_RANK", rank))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
            node = int(environ.get("GROUP_RANK", rank // max(local_world, 1)))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad torchrun environment ({exc}): RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
        return cls(rank, local_rank, world, local_world, node, torchrun=True)


@dataclass(frozen=True)
class Topology:
    """world = dp x cfg x ulysses; rank = (dp * cfg + cfg_index) * ulysses + ulysses_index.

    Consecutive ranks form a Ulysses group and a case's model group (cfg x ulysses ranks) is one
    consecutive block, so with node-contiguous ranks it never leaves a node.
    """

    rank: int
    world_size: int
    ulysses: int
    cfg: int

    @property
    def model_size(self) -> int:
        return self.ulysses * self.cfg

    @property
    def dp(self) -> int:
        return self.world_size // self.model_size

    @property
    def dp_index(self) -> int:
        return self.rank // self.model_size

    @property
    def cfg_index(self) -> int:
        return self.rank // self.ulysses % self.cfg

    @property
    def ulysses_index(self) -> int:
        return self.rank % self.ulysses

    @property
    def is_leader(self) -> bool:
        """The one rank of a model group that decodes and writes (ulysses 0, cfg 0)."""
        return self.ulysses_index == 0 and self.cfg_index == 0

    def rank_of(self, dp: int, cfg: int, ulysses: int) -> int:
        return (dp * self.cfg + cfg) * self.ulysses + ulysses

    def ulysses_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.rank_of(d, c, u) for u in range(self.ulysses)) for d in range(self.dp) for c in range(self.cfg)]

    def cfg_groups(self) -> list[tuple[int, ...]]:
        """CFG peers: same data-parallel group and Ulysses index, every cfg index."""
        return [tuple(self.rank_of(d, c, u) for c in range(self.cfg)) for d in range(self.dp) for u in range(self.ulysses)]

    def model_groups(self) -> list[tuple[int, ...]]:
        return [tuple(range(d * self.model_size, (d + 1) * self.model_size)) for d in range(self.dp)]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def build_topology(env: LaunchEnv, ulysses: int, cfg: int, heads: int | None) -> Topology:
    """Validate the launch against the requested degrees (no collective involved); ValueError names the rule."""
    if ulysses < 1:
        raise ValueError(f"--ulysses {ulysses} is invalid: the Ulysses degree must be >= 1")
    if cfg < 1:
        raise ValueError(f"--cfg_parallel {cfg} is invalid: the CFG-parallel degree must be >= 1")
    model = ulysses * cfg
    world, local_world = env.world_size, env.local_world_size
    if world % model:
        raise ValueError(
            f"WORLD_SIZE {world} is not a multiple of --cfg_parallel x --ulysses = {cfg} x {ulysses} = {model}; "
            f"launch a multiple of {model} processes"
        )
    if heads is not None and heads % ulysses:
        raise ValueError(
            f"--ulysses {ulysses} does not divide the transformer's {heads} attention heads; "
            f"Ulysses splits heads evenly, choose one of: {_divisors(heads)}"
        )
    if model > local_world:
        raise ValueError(
            f"a model group of --cfg_parallel x --ulysses = {model} ranks does not fit on one node of "
            f"LOCAL_WORLD_SIZE {local_world}; Ulysses and CFG traffic must stay inside a node"
        )
    if local_world % model:
        raise ValueError(
            f"LOCAL_WORLD_SIZE {local_world} is not a multiple of the model group size {model} "
            f"(--cfg_parallel x --ulysses); a model group would straddle two nodes"
        )
    if world % local_world:
        raise ValueError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local_world}; run the same number of processes on every node")
    if env.rank != env.node_rank * local_world + env.local_rank:
        raise ValueError(
            f"RANK {env.rank} is not GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK = {env.node_rank} x {local_world} + {env.local_rank}; "
            "model groups need node-contiguous ranks, as torchrun assigns them"
        )
    return Topology(env.rank, world, ulysses, cfg)


def balance(costs: Sequence[float], bins: int) -> list[int]:
    """Greedy longest-processing-time placement: the bin of each item; deterministic on every rank.

    Items go in decreasing cost (ties: earlier first) to the least-loaded bin (ties: lowest index).
    """
    loads = [0.0] * bins
    placement = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(bins), key=lambda b: (loads[b], b))
        placement[item] = target
        loads[target] += costs[item]
    return placement


@dataclass(frozen=True)
class Groups:
    """This rank's process groups; None where the degree is 1 (nothing to exchange)."""

    ulysses: dist.ProcessGroup | None  # device backend: the all-to-alls of attention
    cfg: dist.ProcessGroup | None  # device backend: CFG peers exchange predictions
    model: dist.ProcessGroup  # gloo: status flags of one model group
    control: dist.ProcessGroup  # gloo over the world: plan broadcast, records, exit code


def backend_for(device: torch.device) -> str:
    # The cpu:gloo half carries pickled objects even on GPU runs.
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def _mine(topology: Topology, all_groups: list[tuple[int, ...]], backend: str | None) -> dist.ProcessGroup:
    """Every rank creates every group in the same order (a c10d rule); keep the one holding this rank."""
    found = None
    for ranks in all_groups:
        group = dist.new_group(list(ranks), backend=backend)
        if topology.rank in ranks:
            found = group
    assert found is not None, f"rank {topology.rank} is in no group of {all_groups}"
    return found


def init_distributed(topology: Topology, env: LaunchEnv, device: torch.device, timeout_s: float) -> Groups:
    """Join the world and build the Ulysses, CFG, model and control groups."""
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if env.torchrun:
        dist.init_process_group(backend_for(device), timeout=timeout, **kwargs)
    else:  # plain `python`: a world of one needs no rendezvous
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    ulysses = _mine(topology, topology.ulysses_groups(), None) if topology.ulysses > 1 else None
    cfg = _mine(topology, topology.cfg_groups(), None) if topology.cfg > 1 else None
    model = _mine(topology, topology.model_groups(), "gloo")
    # Control waits span other groups' whole share of the batch (and rank 0's planning), which can
    # outlast --dist_timeout; a hang inside a group still ends at its own device/model timeout.
    control = dist.new_group(backend="gloo", timeout=max(timeout, CONTROL_TIMEOUT))
    log.info(
        "distributed: world %d = dp %d x cfg %d x ulysses %d (%s, timeout %.0f s)",
        topology.world_size, topology.dp, topology.cfg, topology.ulysses, backend_for(device), timeout_s,
    )
    log.info(
        "rank %d on node %d (local rank %d): model group %d, cfg index %d, ulysses index %d",
        topology.rank, env.node_rank, env.local_rank, topology.dp_index, topology.cfg_index, topology.ulysses_index,
    )
    if ulysses is not None:
        register_with_veomni(ulysses)
    return Groups(ulysses, cfg, model, control)


def register_with_veomni(group: dist.ProcessGroup) -> None:
    """Tell VeOmni (when installed) which group is the Ulysses group; nothing here depends on it."""
    try:
        from veomni.distributed.sequence_parallel.comm import set_ulysses_sequence_parallel_group

        set_ulysses_sequence_parallel_group(group)
        log.debug("registered the Ulysses group with VeOmni")
    except Exception as exc:  # absent or a different VeOmni version
        log.debug("VeOmni not used for the Ulysses group (%s: %s)", type(exc).__name__, exc)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """out: [world * N, ...] <- every rank's x: [N, ...] in group order (one contiguous collective)."""
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); older torch has only the old one.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
