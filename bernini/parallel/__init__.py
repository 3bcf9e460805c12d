"""Multi-GPU rendering: data, CFG and Ulysses parallelism; all communication lives in this package."""

from bernini.parallel.cfg import CfgCombos, assign_combos
from bernini.parallel.groups import Groups, LaunchEnv, Topology, balance, build_topology, destroy_distributed, init_distributed
from bernini.parallel.ulysses import UlyssesSequence

__all__ = [
    "CfgCombos",
    "Groups",
    "LaunchEnv",
    "Topology",
    "UlyssesSequence",
    "assign_combos",
    "balance",
    "build_topology",
    "destroy_distributed",
    "init_distributed",
]
