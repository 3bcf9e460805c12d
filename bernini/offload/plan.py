"""The memory plan: the cheapest placement that fits the free GPU and host memory, its expected peaks, and what else would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bernini.offload import sizes as sz
from bernini.offload.advice import MemoryFlags, faster_options, nearest_settings
from bernini.offload.options import (
    OFFLOADS,
    SPARE_BLOCKS,
    STREAMED_BLOCKS,
    WEIGHT_FORMATS,
    Judge,
    Phases,
    Room,
    candidates,
    fits_in,
    phases_of,
    pool_blocks,
    prefetch_bytes,
    switch_need,
    weight_sizes,
)
from bernini.offload.sizes import GiB, ModelSizes, Workload
from bernini.plan import latent_grid

HEADROOM = 0.05  # share of the GPU budget left unplanned: allocator fragmentation, estimate error


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement, what it is expected to need, what would be faster, and (when it does not fit) what would."""

    offload: str
    weights: str
    text_encoder: str  # visit: pinned on the host, copied in to encode | stream: copied in piece by piece | cpu: encodes on the CPU
    vae_tiling: bool
    experts: int
    expert_bytes: float
    prefetch_bytes: float  # expert plan: bytes of the incoming expert copied ahead of the switch
    peak_bytes: float  # expected GPU allocator peak (0 on the CPU)
    gpu_budget: float | None  # free GPU memory, capped by max_gpu_memory; None: unknown or CPU
    host_bytes: float  # expected host memory the process holds (pinned copies included)
    host_free: float | None
    fits: bool | None
    chosen_by: str  # auto | forced
    on_gpu: bool = True
    faster: tuple[str, ...] = ()
    batch_passes: bool = True  # False: the guidance passes run one at a time because batched ones would not fit
    chunk_tokens: int = 0  # > 0: the DiT runs its activations in runs of this many tokens (exact)
    host: str = "pinned"  # block plan: pinned | one | disk (see HOST_PLACES)
    host_blocks: int = 0  # host one/disk: pinned block buffers
    phases: Phases | None = None
    cost: float = 0.0  # expected extra time, % of a case with everything resident
    nearest: tuple[str, ...] = ()  # when it does not fit: the nearest settings that would

    @property
    def reads_blocks(self) -> bool:
        """Whether the experts' blocks stay in their files and are read into pinned buffers as they are used."""
        return self.offload == "block" and self.host != "pinned"

    def describe(self) -> str:
        """One log line: the plan, its expected peaks and cost, and what would be faster (or would fit)."""
        host = "unknown" if self.host_free is None else f"{self.host_free / GiB:.1f}"
        if not self.on_gpu:
            where = "everything in host memory" if self.offload == "none" else "device and host are the same memory: offload only exercises its copies"
            verdict = f" -- does NOT fit; nearest settings that fit: {'; '.join(self.nearest)}" if self.fits is False else ""
            return f"memory plan: {self.offload} on the CPU ({where}); weights {self.weights}; host {self.host_bytes / GiB:.1f} GiB of {host} GiB{verdict}"
        budget = "unknown" if self.gpu_budget is None else f"{self.gpu_budget / GiB:.1f}"
        verdict = {True: "", False: " -- does NOT fit", None: " (free memory unknown)"}[self.fits]
        phases = "" if self.phases is None else (f" (text {self.phases.text / GiB:.1f}, encode {self.phases.encode / GiB:.1f}, "
                                                 f"denoise {self.phases.denoise / GiB:.1f}, decode {self.phases.decode / GiB:.1f})")
        chunks = f"in runs of {self.chunk_tokens} tokens" if self.chunk_tokens else "whole"
        tips = (f"nearest settings that fit: {'; '.join(self.nearest) or 'none found: free GPU or host memory'}" if self.fits is False
                else f"faster: {'; '.join(self.faster) or 'nothing to gain'}")
        return (
            f"memory plan: {self.offload} ({self._what()}); weights {self.weights}; text encoder {_TEXT_WORDS[self.text_encoder]}; "
            f"VAE {'tiled' if self.vae_tiling else 'untiled'}; guidance passes {'batched' if self.batch_passes else 'one at a time'}; activations {chunks}; "
            f"expected peak {self.peak_bytes / GiB:.1f} GiB{phases} of {budget} GiB on the GPU, {self.host_bytes / GiB:.1f} GiB of {host} GiB on the host; "
            f"expected cost +{self.cost:.0f}% time ({self.chosen_by}){verdict}; {tips}"
        )

    def _what(self) -> str:
        if self.offload == "none":
            return "every expert resident on the GPU"
        if self.offload == "block":
            where = {"pinned": "pinned host memory",
                     "one": f"pinned host memory, which holds only the expert in use (+{SPARE_BLOCKS} blocks): the other is read back from disk at the switch",
                     "disk": f"{self.host_blocks} pinned host buffers, read from disk as they are needed"}[self.host]
            return f"blocks stream from {where}, {STREAMED_BLOCKS} at most on the GPU; embeddings and head resident"
        if self.prefetch_bytes >= self.expert_bytes:
            how = "prefetched in full on a side stream during the last steps before the switch"
        elif self.prefetch_bytes > 0:
            how = (f"{self.prefetch_bytes / GiB:.1f} of {self.expert_bytes / GiB:.1f} GiB prefetched before the switch, the rest copied "
                   "at the switch while the first blocks run")
        else:
            how = "no room to prefetch: copied at the switch (non-blocking, from pinned memory) while the first blocks run"
        return f"one expert on the GPU, the other waits in pinned host memory; {how}"

    def refusal(self) -> str:
        """Why the run cannot start, and the nearest settings that would fit."""
        return f"this run does not fit this machine: {self.describe()}"

    def to_info(self) -> dict[str, Any]:
        """What the sidecar records (RenderOutput.info['memory_plan'])."""
        return {
            "offload": self.offload,
            "weights": self.weights,
            "text_encoder": self.text_encoder,
            "vae_tiling": self.vae_tiling,
            "batch_passes": self.batch_passes,
            "chunk_tokens": self.chunk_tokens,
            "host": self.host,
            "host_blocks": self.host_blocks,
            "prefetch_gib": _gib(self.prefetch_bytes),
            "expected_peak_gib": _gib(self.peak_bytes),
            "expected_phase_peaks_gib": None if self.phases is None else {k: _gib(getattr(self.phases, k)) for k in ("text", "encode", "denoise", "decode")},
            "gpu_budget_gib": _gib(self.gpu_budget),
            "host_gib": _gib(self.host_bytes),
            "host_free_gib": _gib(self.host_free),
            "fits": self.fits,
            "chosen_by": self.chosen_by,
            "cost_percent": round(self.cost, 1),
            "faster": list(self.faster),
            "nearest": list(self.nearest),
            "summary": self.describe(),
        }


class MemoryPlanError(ValueError):
    """The run cannot fit this machine; raised before any model loads."""


def require_fit(plan: MemoryPlan) -> None:
    """Refuse, before anything loads, a plan that does not fit (unknown free memory is not refused)."""
    if plan.fits is False:
        raise MemoryPlanError(plan.refusal())


def _gib(x: float | None) -> float | None:
    return None if x is None else round(x / GiB, 2)


_TEXT_WORDS = {"visit": "pinned on the host, visits the GPU to encode", "stream": "pinned on the host, visits the GPU a layer at a time",
               "cpu": "encodes on the CPU"}


def gpu_budget(gpu_free: float | None, max_gpu_memory: float | None) -> float | None:
    """Free GPU bytes, capped by --max_gpu_memory (GiB)."""
    cap = None if max_gpu_memory is None else max_gpu_memory * GiB
    if gpu_free is None:
        return cap
    return gpu_free if cap is None else min(gpu_free, cap)


def plan_memory(
    sizes: ModelSizes,
    load: Workload,
    *,
    dtype: str,
    weights_format: str = "bf16",
    offload: str = "auto",
    t5_cpu: bool = False,
    vae_tiling: bool | None = None,
    on_gpu: bool = True,
    gpu_free: float | None = None,
    host_free: float | None = None,
    max_gpu_memory: float | None = None,
    batch_passes: bool = True,
    host_memory: float | None = None,
    stored: str | None = None,
    transforms: bool = False,
) -> MemoryPlan:
    """The cheapest placement that fits the free memory (offload='auto'), or the forced one, with its numbers.

    batch_passes=False (--no-batch_passes) keeps the passes one at a time; True lets the plan unbatch them to fit.
    host_memory: --host_memory GiB (the machine's RAM; the plan keeps OS_RESERVE of it free). stored: what the expert
    files hold ("bf16": a checkpoint, "fp8": `bernini convert --weights fp8` output, None: unknown, every expert stays pinned).
    transforms: the weights change at load (LoRAs merged, --fp8_gemm conversions), so no block is read back from the files.
    """
    if offload not in (*OFFLOADS, "auto"):
        raise ValueError(f"unknown --offload {offload!r}; choose auto, {', '.join(OFFLOADS)}")
    if weights_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown --weights {weights_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if stored == "fp8" and weights_format != "fp8":
        raise ValueError("the experts hold FP8 weights written by `bernini convert --weights fp8`: run with --weights fp8, "
                         "or pass the original checkpoints (or a `bernini convert --weights bf16` output) for bf16")
    if transforms and stored == "fp8":
        raise ValueError("LoRAs merge into bf16 weights, but the experts hold FP8 weights written by `bernini convert --weights fp8`: "
                         "pass the original checkpoints with --lora (and --weights fp8 to quantize after the merge)")
    if transforms:
        stored = None  # what the files hold is not what runs: every block stays in host memory
    host_free = sz.host_room(host_free, host_memory)
    ws = weight_sizes(sizes, dtype, weights_format)
    chosen_by = "auto" if offload == "auto" else "forced"
    if not on_gpu:
        mode = "none" if offload == "auto" else offload
        work = max(sz.denoise_bytes(load, sizes, sz.DTYPE_BYTES[dtype], batch_passes), sz.vae_bytes(load.pixels, load.frames, sizes))
        host = ws.experts * ws.expert + ws.text_encoder + ws.vae + work + sz.HOST_RESERVE
        fits = fits_in(host, host_free)
        nearest = (f"free {(host - host_free) / GiB:.1f} GiB of host memory (everything runs in it on the CPU)",) if fits is False and host_free is not None else ()
        return MemoryPlan(mode, weights_format, "cpu", bool(vae_tiling), ws.experts, ws.expert, 0.0, 0.0, None,
                          host, host_free, fits, chosen_by, on_gpu=False, batch_passes=batch_passes, nearest=nearest)
    budget = gpu_budget(gpu_free, max_gpu_memory)
    capped = max_gpu_memory is not None and (gpu_free is None or max_gpu_memory * GiB < gpu_free)
    room = Room(None if budget is None else budget * (1 - HEADROOM), host_free, capped)
    judge = Judge(sizes, load, dtype, ws, room)
    options = candidates(offload, t5_cpu, vae_tiling, batch_passes, stored == weights_format)
    verdicts = [judge.viable(o) for o in options]
    index = next((i for i, v in enumerate(verdicts) if v), None)
    if index is None:  # free memory unknown: the cheapest not known to fail; nothing fits: the leanest
        index = next((i for i, v in enumerate(verdicts) if v is None), None)
    if index is None:
        index = min(range(len(options)), key=lambda i: (judge.gpu(options[i]), judge.host(options[i])))
    option = options[index]
    phases = phases_of(ws, sizes, load, dtype, option)
    prefetch = prefetch_bytes(ws, sizes, load, dtype, option, room.gpu)
    peak = max(phases.peak, switch_need(ws, sizes, load, dtype, option) + prefetch)
    fits = verdicts[index]
    flags = MemoryFlags(offload, t5_cpu, vae_tiling, batch_passes, weights_format, stored)
    nearest = nearest_settings(sizes, load, dtype, room, flags) if fits is False else ()
    faster = nearest or faster_options(sizes, load, dtype, weights_format, option, room, t5_cpu, fits, batch_passes, stored)
    return MemoryPlan(option.offload, weights_format, option.text, option.tiling, ws.experts, ws.expert, prefetch, peak, budget,
                      judge.host(option), host_free, fits, chosen_by, faster=faster, batch_passes=option.batch, chunk_tokens=option.chunk,
                      host=option.host, host_blocks=pool_blocks(ws, option, room.host), phases=phases, cost=option.cost, nearest=nearest)


# --------------------------------------------------------------------------- the plan of this run


def reference_workload(frames: int = 81, height: int = 480, width: int = 848, forwards: int = 2) -> Workload:
    """480p, 81 frames, the u/c pair batched: what the plan sizes for when the cases are not known."""
    t, h, w = latent_grid(frames, height, width)
    n = t * h * w
    return Workload(tokens=forwards * n, pixels=height * width, frames=frames, single_tokens=n, sequence=n, target=n, max_side=max(height, width))


def host_share(host_free: float | None, ranks: int) -> float | None:
    """Each of ``ranks`` processes on one host pins its own expert and UMT5 copies: it may plan with its share only."""
    return None if host_free is None else host_free / max(ranks, 1)


def plan_for_run(
    base: Path, experts: int, runtime: Any, device: torch.device, load: Workload | None = None, text_tokens: int = 512, stored: str | None = None
) -> MemoryPlan:
    """The plan for this machine's free memory, the runtime's flags and the largest case (480p when not given)."""
    sizes = sz.read_sizes(base, experts, text_tokens)
    host_memory = getattr(runtime, "host_memory", None)
    return plan_memory(
        sizes,
        load or reference_workload(),
        dtype=runtime.dtype,
        weights_format=runtime.weights,
        offload=runtime.offload,
        t5_cpu=runtime.t5_cpu,
        vae_tiling=runtime.vae_tiling,
        on_gpu=device.type == "cuda",
        gpu_free=sz.gpu_free_bytes(str(device)),
        host_free=host_share(sz.host_free_bytes(), runtime.host_ranks),
        max_gpu_memory=runtime.max_gpu_memory,
        batch_passes=runtime.batch_passes,
        host_memory=None if host_memory is None else host_memory / max(runtime.host_ranks, 1),
        stored=stored,
        transforms=bool(getattr(runtime, "loras", ())) or (runtime.weights == "bf16" and getattr(runtime, "fp8_gemm", "off") != "off"),
    )
