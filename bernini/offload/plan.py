"""The memory plan (none | expert | block): the fastest placement that fits the free memory, its expected peak, what would be faster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bernini import memory
from bernini.plan import latent_grid

GiB = 2**30
OFFLOADS = ("none", "expert", "block")  # fastest first
WEIGHT_FORMATS = ("bf16", "fp8")
STREAMED_BLOCKS = 3  # block plan: block i, block i+1 in flight, and the next expert's block 0 near a switch
PREFETCH_MARGIN = 1 * GiB  # expert plan: room left free while prefetching the incoming expert
VAE_TILE_PIXELS = 256 * 256  # diffusers' default AutoencoderKLWan tile
HEADROOM = 0.05  # share of the GPU budget left unplanned: allocator fragmentation, estimate error


@dataclass(frozen=True)
class WeightSizes:
    """Bytes of the models in the chosen storage, derived from bernini.memory's sizes."""

    expert: float
    nonblock: float  # embeddings, time/text embedders, head: what the block plan keeps resident
    block: float
    experts: int
    text_encoder: float
    vae: float


@dataclass(frozen=True)
class Work:
    """Working memory of the largest case: DiT activations (combos batched and one at a time) and the VAE, untiled and tiled."""

    activations: float
    vae: float
    vae_tiled: float
    single_activations: float = 0.0

    def dit(self, batch: bool) -> float:
        return self.activations if batch else self.single_activations


@dataclass(frozen=True)
class Option:
    """One candidate placement: offload mode, text encoder placement (visit | cpu), VAE tiling, combos batched."""

    offload: str
    text: str
    tiling: bool
    batch: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement, what it is expected to need, and what would make the run faster."""

    offload: str
    weights: str
    text_encoder: str  # visit: pinned on the host, copied in to encode | cpu: encodes on the CPU
    vae_tiling: bool
    experts: int
    expert_bytes: float
    prefetch_bytes: float  # expert plan: bytes of the incoming expert copied ahead of the switch
    peak_bytes: float  # expected GPU peak (0 on the CPU)
    gpu_budget: float | None  # free GPU memory, capped by max_gpu_memory; None: unknown or CPU
    host_bytes: float
    host_free: float | None
    fits: bool | None
    chosen_by: str  # auto | forced
    on_gpu: bool = True
    faster: tuple[str, ...] = ()
    batch_combos: bool = True  # False: the guidance passes run one at a time because batched ones would not fit

    def describe(self) -> str:
        """One log line: the plan, its expected peak, and what would be faster."""
        if not self.on_gpu:
            where = "everything in host memory" if self.offload == "none" else "device and host are the same memory: offload only exercises its copies"
            host = "unknown" if self.host_free is None else f"{self.host_free / GiB:.1f}"
            verdict = " -- does NOT fit" if self.fits is False else ""
            return f"memory plan: {self.offload} on the CPU ({where}); weights {self.weights}; host {self.host_bytes / GiB:.1f} GiB of {host} GiB{verdict}"
        budget = "unknown" if self.gpu_budget is None else f"{self.gpu_budget / GiB:.1f}"
        host = "unknown" if self.host_free is None else f"{self.host_free / GiB:.1f}"
        verdict = {True: "", False: " -- does NOT fit", None: " (free memory unknown)"}[self.fits]
        return (
            f"memory plan: {self.offload} ({self._what()}); weights {self.weights}; text encoder {_TEXT_WORDS[self.text_encoder]}; "
            f"VAE {'tiled' if self.vae_tiling else 'untiled'}; guidance passes {'batched' if self.batch_combos else 'one at a time'}; expected peak {self.peak_bytes / GiB:.1f} GiB of {budget} GiB, "
            f"host {self.host_bytes / GiB:.1f} GiB of {host} GiB ({self.chosen_by}){verdict}; faster: {'; '.join(self.faster) or 'nothing to gain'}"
        )

    def _what(self) -> str:
        if self.offload == "none":
            return "every expert resident on the GPU"
        if self.offload == "block":
            return f"blocks stream from pinned host memory, {STREAMED_BLOCKS} at most on the GPU; embeddings and head resident"
        if self.prefetch_bytes >= self.expert_bytes:
            how = "prefetched in full on a side stream during the last steps before the switch"
        elif self.prefetch_bytes > 0:
            how = (f"{self.prefetch_bytes / GiB:.1f} of {self.expert_bytes / GiB:.1f} GiB prefetched before the switch, the rest copied "
                   "at the switch while the first blocks run")
        else:
            how = "no room to prefetch: copied at the switch (non-blocking, from pinned memory) while the first blocks run"
        return f"one expert on the GPU, the other waits in pinned host memory; {how}"

    def to_info(self) -> dict[str, Any]:
        """What the sidecar records (RenderOutput.info['memory_plan'])."""
        return {
            "offload": self.offload,
            "weights": self.weights,
            "text_encoder": self.text_encoder,
            "vae_tiling": self.vae_tiling,
            "batch_combos": self.batch_combos,
            "prefetch_gib": _gib(self.prefetch_bytes),
            "expected_peak_gib": _gib(self.peak_bytes),
            "gpu_budget_gib": _gib(self.gpu_budget),
            "host_gib": _gib(self.host_bytes),
            "host_free_gib": _gib(self.host_free),
            "fits": self.fits,
            "chosen_by": self.chosen_by,
            "faster": list(self.faster),
            "summary": self.describe(),
        }


def _gib(x: float | None) -> float | None:
    return None if x is None else round(x / GiB, 2)


_TEXT_WORDS = {"visit": "pinned on the host, visits the GPU to encode", "cpu": "encodes on the CPU"}


def weight_sizes(sizes: memory.ModelSizes, dtype: str, weights_format: str = "bf16") -> WeightSizes:
    """Expert, block and non-block bytes; fp8 stores block Linear weights in 1 byte plus a float32 scale per row."""
    nbytes = memory.DTYPE_BYTES[dtype]
    d, f, layers = sizes.dim, sizes.ffn_dim, sizes.num_layers
    block_params = 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (2 * d * f + f + d) + 6 * d  # as memory.transformer_params
    block = float(block_params * nbytes)
    if weights_format == "fp8":
        linear, rows = 8 * d * d + 2 * d * f, 9 * d + f  # q/k/v/out of both attentions, FFN in/out
        block -= linear * (nbytes - 1) - rows * 4
    nonblock = float(max(sizes.expert_params - layers * block_params, 0) * nbytes)
    return WeightSizes(nonblock + layers * block, nonblock, block, sizes.experts, float(sizes.text_encoder_params * nbytes), float(sizes.vae_bytes))


def work_of(sizes: memory.ModelSizes, load: memory.Workload, dtype: str) -> Work:
    act = memory.activation_bytes(load.tokens, sizes, memory.DTYPE_BYTES[dtype])
    tiled = memory.Workload(load.tokens, min(load.pixels, VAE_TILE_PIXELS), load.frames)
    # A tiled decode still holds the decoded clip; only the per-chunk feature maps shrink.
    vae_tiled = memory.vae_work_bytes(tiled, sizes) + load.frames * (load.pixels - tiled.pixels) * 3 * 4
    single = memory.activation_bytes(load.unbatched_tokens, sizes, memory.DTYPE_BYTES[dtype])
    return Work(act, memory.vae_work_bytes(load, sizes), vae_tiled, single)


def resident_weights(ws: WeightSizes, offload: str) -> float:
    """Expert bytes on the GPU at once under each offload mode."""
    return {"none": ws.experts * ws.expert, "expert": ws.expert, "block": ws.experts * ws.nonblock + STREAMED_BLOCKS * ws.block}[offload]


def gpu_need(ws: WeightSizes, work: Work, option: Option) -> float:
    """Expected GPU peak: the resident weights plus the largest phase (encode, denoise or VAE)."""
    text_visit = ws.text_encoder if option.text == "visit" else 0.0
    vae_work = work.vae_tiled if option.tiling else work.vae
    return memory.GPU_RESERVE + ws.vae + resident_weights(ws, option.offload) + max(work.dit(option.batch), vae_work, text_visit)


def host_need(ws: WeightSizes, option: Option) -> float:
    """Host memory the placement holds: pinned expert copies (both, so a move back is only a copy) and UMT5."""
    experts = {"none": 0.0, "expert": ws.experts * ws.expert, "block": ws.experts * (ws.expert - ws.nonblock)}[option.offload]
    return memory.HOST_RESERVE + experts + ws.text_encoder


def candidates(offload: str, t5_cpu: bool, vae_tiling: bool | None, batch_combos: bool = True) -> list[Option]:
    """Placements in order of speed: fewer copies first; within an offload level VAE tiling, then guidance passes one
    at a time (slightly slower; lossless, and what the official renderer does); CPU text encoding last.

    UMT5 never stays on the GPU (its memory is worth more to experts and activations than one pinned copy per case).
    """
    offloads = OFFLOADS if offload == "auto" else (offload,)
    tilings = (False, True) if vae_tiling is None else (vae_tiling,)
    batches = (True, False) if batch_combos else (False,)
    texts = ("cpu",) if t5_cpu else ("visit", "cpu")  # 1024 tokens through UMT5-XXL on the CPU: tens of seconds a case
    return [Option(o, t, v, b) for t in texts for o in offloads for b in batches for v in tilings]


@dataclass(frozen=True)
class Room:
    """What a plan may use: GPU bytes (the headroom already taken off) and host bytes; None: unknown."""

    gpu: float | None
    host: float | None
    capped: bool = False  # the GPU figure is --max_gpu_memory, not what the card has free


def _fits(need: float, have: float | None) -> bool | None:
    return None if have is None else need <= have


def _viable(ws: WeightSizes, work: Work, option: Option, room: Room) -> bool | None:
    gpu, host = _fits(gpu_need(ws, work, option), room.gpu), _fits(host_need(ws, option), room.host)
    if gpu is False or host is False:
        return False
    return None if gpu is None or host is None else True


def gpu_budget(gpu_free: float | None, max_gpu_memory: float | None) -> float | None:
    """Free GPU bytes, capped by --max_gpu_memory (GiB)."""
    cap = None if max_gpu_memory is None else max_gpu_memory * GiB
    if gpu_free is None:
        return cap
    return gpu_free if cap is None else min(gpu_free, cap)


def plan_memory(
    sizes: memory.ModelSizes,
    load: memory.Workload,
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
    batch_combos: bool = True,
) -> MemoryPlan:
    """The fastest placement that fits the free memory (offload='auto'), or the forced one, with its numbers.

    batch_combos=False (--no-batch_combos) keeps the passes one at a time; True lets the plan unbatch them to fit."""
    if offload not in (*OFFLOADS, "auto"):
        raise ValueError(f"unknown --offload {offload!r}; choose auto, {', '.join(OFFLOADS)}")
    if weights_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown --weights {weights_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    ws, work = weight_sizes(sizes, dtype, weights_format), work_of(sizes, load, dtype)
    chosen_by = "auto" if offload == "auto" else "forced"
    if not on_gpu:
        option = Option("none" if offload == "auto" else offload, "cpu", bool(vae_tiling))
        host = ws.experts * ws.expert + ws.text_encoder + ws.vae + max(work.activations, work.vae) + memory.HOST_RESERVE
        return MemoryPlan(option.offload, weights_format, "cpu", option.tiling, ws.experts, ws.expert, 0.0, 0.0, None,
                          host, host_free, _fits(host, host_free), chosen_by, on_gpu=False, batch_combos=batch_combos)
    budget = gpu_budget(gpu_free, max_gpu_memory)
    capped = max_gpu_memory is not None and (gpu_free is None or max_gpu_memory * GiB < gpu_free)
    room = Room(None if budget is None else budget * (1 - HEADROOM), host_free, capped)
    options = candidates(offload, t5_cpu, vae_tiling, batch_combos)
    verdicts = [_viable(ws, work, o, room) for o in options]
    index = next((i for i, v in enumerate(verdicts) if v), None)
    if index is None:  # unknown free memory: the fastest; nothing fits: the most frugal
        index = 0 if verdicts[0] is None else len(options) - 1
    option = options[index]
    prefetch = prefetch_bytes(ws, work, option, room.gpu)
    peak = max(gpu_need(ws, work, option), switch_need(ws, work, option) + prefetch)
    faster = faster_options(sizes, load, dtype, weights_format, option, room, t5_cpu, verdicts[index], batch_combos)
    return MemoryPlan(option.offload, weights_format, option.text, option.tiling, ws.experts, ws.expert, prefetch, peak, budget,
                      host_need(ws, option), host_free, verdicts[index], chosen_by, faster=faster, batch_combos=option.batch)


def prefetch_bytes(ws: WeightSizes, work: Work, option: Option, usable: float | None) -> float:
    """Expert plan: what of the incoming expert fits beside the outgoing one and the last step's activations."""
    if option.offload != "expert" or ws.experts < 2 or usable is None:
        return 0.0  # unknown free memory: copy at the switch, never risk an out-of-memory
    return float(min(max(usable - switch_need(ws, work, option) - PREFETCH_MARGIN, 0.0), ws.expert))


def switch_need(ws: WeightSizes, work: Work, option: Option) -> float:
    """GPU bytes in use during the last step before an expert switch (before any prefetch)."""
    return memory.GPU_RESERVE + ws.vae + resident_weights(ws, option.offload) + work.dit(option.batch)


def faster_options(
    sizes: memory.ModelSizes,
    load: memory.Workload,
    dtype: str,
    weights_format: str,
    chosen: Option,
    room: Room,
    t5_cpu: bool,
    fits: bool | None,
    batch_combos: bool = True,
) -> tuple[str, ...]:
    """What would make the run faster than the chosen placement (or make it fit): memory to free, or flags."""
    if room.gpu is None:
        return ()
    ws, work = weight_sizes(sizes, dtype, weights_format), work_of(sizes, load, dtype)
    if fits is False:
        tips = [_shortfall(ws, work, chosen, room, f"--offload {chosen.offload}")]
    else:
        tips = [_shortfall(ws, work, _leanest(ws, work, o, chosen.tiling), room, f"--offload {o}") for o in OFFLOADS[: OFFLOADS.index(chosen.offload)]]
        tips += [_text_tip(ws, work, chosen, room, t5_cpu)]
        if chosen.tiling:
            tips.append(_shortfall(ws, work, Option(chosen.offload, chosen.text, False, chosen.batch), room, "an untiled VAE"))
        if batch_combos and not chosen.batch:
            tips.append(_shortfall(ws, work, Option(chosen.offload, chosen.text, chosen.tiling, True), room, "batched guidance passes"))
    tips.append(_fp8_tip(sizes, work, dtype, weights_format, chosen, room, fits))
    if fits is False:
        tips.append(f"or lower --max_image_size/--num_frames (activations: {work.dit(chosen.batch) / GiB:.1f} GiB)")
    return tuple(t for t in tips if t)


def _leanest(ws: WeightSizes, work: Work, offload: str, tiling: bool) -> Option:
    return min((Option(offload, t, tiling, b) for t in ("visit", "cpu") for b in (True, False)), key=lambda o: gpu_need(ws, work, o))


def _text_tip(ws: WeightSizes, work: Work, chosen: Option, room: Room, t5_cpu: bool) -> str:
    if chosen.text == "cpu":
        what = "dropping --t5_cpu (encode on the GPU)" if t5_cpu else "the text encoder to visit the GPU (CPU encoding is slow)"
        return _shortfall(ws, work, Option(chosen.offload, "visit", chosen.tiling, chosen.batch), room, what)
    return ""


def _fp8_tip(sizes: memory.ModelSizes, work: Work, dtype: str, weights_format: str, chosen: Option, room: Room, fits: bool | None) -> str:
    """--weights fp8 where it reaches a faster offload (or, when nothing fits, any that fits)."""
    if weights_format != "bf16":
        return ""
    fp8 = weight_sizes(sizes, dtype, "fp8")
    reach = OFFLOADS[: OFFLOADS.index(chosen.offload) + (1 if fits is False else 0)]
    for offload in reach:
        if any(_viable(fp8, work, Option(offload, "visit", v, b), room) for v in (False, True) for b in (True, False)):
            return f"--weights fp8 (lossy) fits --offload {offload}"
    return ""


def _shortfall(ws: WeightSizes, work: Work, option: Option, room: Room, what: str) -> str:
    gpu_short = gpu_need(ws, work, option) - room.gpu if room.gpu is not None else 0.0
    host_short = host_need(ws, option) - room.host if room.host is not None else 0.0
    parts = [f"{gpu_short / GiB:.1f} GiB of GPU memory" + (" (raise --max_gpu_memory)" if room.capped else "")] if gpu_short > 0 else []
    parts += [f"{host_short / GiB:.1f} GiB of host memory"] if host_short > 0 else []
    return f"free {' and '.join(parts)} for {what}" if parts else ""


def reference_workload(frames: int = 81, height: int = 480, width: int = 848, forwards: int = 2) -> memory.Workload:
    """480p, 81 frames, the u/c pair batched: what the plan sizes for when the cases are not known."""
    t, h, w = latent_grid(frames, height, width)
    return memory.Workload(tokens=forwards * t * h * w, pixels=height * width, frames=frames, single_tokens=t * h * w)


def host_share(host_free: float | None, ranks: int) -> float | None:
    """Each of ``ranks`` processes on one host pins its own expert and UMT5 copies: it may plan with its share only."""
    return None if host_free is None else host_free / max(ranks, 1)


def plan_for_run(base: Path, experts: int, runtime: Any, device: torch.device, load: memory.Workload | None = None, text_tokens: int = 512) -> MemoryPlan:
    """The plan for this machine's free memory, the runtime's flags and the largest case (480p when not given)."""
    sizes = memory.read_sizes(base, experts, text_tokens)
    return plan_memory(
        sizes,
        load or reference_workload(),
        dtype=runtime.dtype,
        weights_format=runtime.weights,
        offload=runtime.offload,
        t5_cpu=runtime.t5_cpu,
        vae_tiling=runtime.vae_tiling,
        on_gpu=device.type == "cuda",
        gpu_free=memory.gpu_free_bytes(str(device)),
        host_free=host_share(memory.host_free_bytes(), runtime.host_ranks),
        max_gpu_memory=runtime.max_gpu_memory,
        batch_combos=runtime.batch_combos,
    )
