"""Multi-GPU rendering: data, CFG and Ulysses parallelism; all communication lives in this package.

Exports what callers outside the package use. `bernini.parallel.runner` is the torchrun entry
(infer_multi_gpu.py) and is imported as a module; tests of one helper import it from its module.
"""

from bernini.parallel.cfg import CfgPasses, assign_passes
from bernini.parallel.groups import (
    LaunchEnv,
    Topology,
    all_gather_into,
    balance,
    build_topology,
    destroy_distributed,
    init_distributed,
)
from bernini.parallel.peers import DistPeers, LocalPeers, Peers
from bernini.parallel.ulysses import UlyssesSequence
from bernini.parallel.world import DistWorld, assign_cases, device_for, expert_heads, placement_for, serving_topology

__all__ = [
    "CfgPasses", "DistPeers", "DistWorld", "LaunchEnv", "LocalPeers", "Peers", "Topology", "UlyssesSequence",
    "all_gather_into", "assign_cases", "assign_passes", "balance", "build_topology", "destroy_distributed",
    "device_for", "expert_heads", "init_distributed", "placement_for", "serving_topology",
]
