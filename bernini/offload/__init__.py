"""Where the experts live during a run: the memory plan (none | expert | block) and the store that keeps it."""

from bernini.offload.host import ALIGN, PAGE, HostCopy, HostModule, Slot, host_copy, module_slots
from bernini.offload.plan import (
    HEADROOM,
    OFFLOADS,
    PREFETCH_MARGIN,
    STREAMED_BLOCKS,
    VAE_TILE_PIXELS,
    WEIGHT_FORMATS,
    GiB,
    MemoryPlan,
    Option,
    Room,
    WeightSizes,
    Work,
    candidates,
    faster_options,
    gpu_budget,
    gpu_need,
    host_need,
    plan_for_run,
    plan_memory,
    prefetch_bytes,
    reference_workload,
    resident_weights,
    switch_need,
    weight_sizes,
    work_of,
)
from bernini.offload.store import ExpertStore, StreamedBlocks, load_blockwise

__all__ = [
    "ALIGN", "HEADROOM", "OFFLOADS", "PAGE", "PREFETCH_MARGIN", "STREAMED_BLOCKS", "VAE_TILE_PIXELS", "WEIGHT_FORMATS",
    "ExpertStore", "GiB", "HostCopy", "HostModule", "MemoryPlan", "Option", "Room", "Slot", "StreamedBlocks", "WeightSizes", "Work",
    "candidates", "faster_options", "gpu_budget", "gpu_need", "host_copy", "host_need", "load_blockwise", "module_slots", "plan_for_run",
    "plan_memory", "prefetch_bytes", "reference_workload", "resident_weights", "switch_need", "weight_sizes", "work_of",
]
