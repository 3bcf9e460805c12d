"""Where the models live during a run: what they weigh (sizes), the placements (options) and the memory plan, the store that keeps it."""

from bernini.offload.disk import BlockFiles, stored_format
from bernini.offload.host import ALIGN, PAGE, HostCopy, HostModule, Slot, host_copy, module_slots, text_pieces
from bernini.offload.options import (
    HOST_PLACES,
    OFFLOADS,
    PREFETCH_MARGIN,
    STREAMED_BLOCKS,
    TEXT_PLACES,
    VAE_TILE_PIXELS,
    WEIGHT_FORMATS,
    Option,
    Phases,
    Room,
    WeightSizes,
    candidates,
    gpu_need,
    host_need,
    phases_of,
    resident_weights,
    weight_sizes,
)
from bernini.offload.plan import HEADROOM, MemoryPlan, MemoryPlanError, gpu_budget, plan_for_run, plan_memory, reference_workload, require_fit
from bernini.offload.pool import BlockPool
from bernini.offload.sizes import GB, GiB, ModelSizes, Workload, read_sizes, workload_of
from bernini.offload.store import ExpertStore, StreamedBlocks, load_blockwise, load_lazily

__all__ = [
    "ALIGN", "GB", "HEADROOM", "HOST_PLACES", "OFFLOADS", "PAGE", "PREFETCH_MARGIN", "STREAMED_BLOCKS", "TEXT_PLACES", "VAE_TILE_PIXELS", "WEIGHT_FORMATS",
    "BlockFiles", "BlockPool", "ExpertStore", "GiB", "HostCopy", "HostModule", "MemoryPlan", "MemoryPlanError", "ModelSizes", "Option", "Phases", "Room",
    "Slot", "StreamedBlocks", "WeightSizes", "Workload", "candidates", "gpu_budget", "gpu_need", "host_copy", "host_need", "load_blockwise", "load_lazily",
    "module_slots", "phases_of", "plan_for_run", "plan_memory", "read_sizes", "reference_workload", "require_fit", "resident_weights", "stored_format",
    "text_pieces", "weight_sizes", "workload_of",
]
