"""Placements and what each needs: the candidate options, their GPU peak per phase, their host memory and their cost.

A placement says where the experts live (offload none | expert | block; for block, whether every block waits pinned
in host memory, only the expert in use, or neither and blocks are read from disk as they are used), where UMT5
encodes (visit | stream | cpu), whether the guidance passes are batched, whether the DiT runs its activations in
runs of tokens (chunk), and whether the VAE tiles. Everything but FP8 storage and VAE tiling is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bernini.offload import sizes as sz
from bernini.offload.sizes import GiB, ModelSizes, Workload

OFFLOADS = ("none", "expert", "block")  # fastest first
WEIGHT_FORMATS = ("bf16", "fp8")
TEXT_PLACES = ("visit", "stream", "cpu")
HOST_PLACES = ("pinned", "one", "disk")  # block plan: every expert pinned | the expert in use pinned | a few blocks pinned
CHUNKS = (0, 16384, 8192, 4096)  # tokens per run of a chunked forward; 0: whole
STREAMED_BLOCKS = 3  # block plan: block i, block i+1 in flight, and the next expert's block 0 near a switch
SPARE_BLOCKS = 4  # host 'one': buffers that take the next expert's first blocks ahead of the switch
DISK_BLOCKS = 8  # host 'disk': the fewest pinned buffers blocks are read into (more when the host has room: they cache)
VAE_TILE_PIXELS = 256 * 256  # diffusers' default AutoencoderKLWan tile
PREFETCH_MARGIN = 1 * GiB  # expert plan: room left free while prefetching the incoming expert
GPU_RESERVE = 0.5 * GiB  # beyond the expected peak: cuBLAS/cuDNN workspaces, allocator rounding, the caching pool's slack

# What each choice costs, in % of a 40-step 480p case with everything resident (the plan takes the cheapest that fits).
COSTS: dict[tuple[str, Any], float] = {
    ("offload", "none"): 0.0, ("offload", "expert"): 0.3, ("offload", "block"): 7.0,
    ("host", "pinned"): 0.0, ("host", "one"): 3.0, ("host", "disk"): 40.0,  # disk: an expert's bytes read every forward
    ("text", "visit"): 0.0, ("text", "stream"): 0.1, ("text", "cpu"): 15.0,  # cpu: UMT5-XXL on the CPU, tens of seconds a case
    ("batch", True): 0.0, ("batch", False): 2.0,
    ("tiling", False): 0.0, ("tiling", True): 0.5,
}
CHUNK_COST = {0: 0.0, 16384: 2.5, 8192: 3.0, 4096: 4.0}  # runs recompute the attention's modulation chain; smaller kernels


@dataclass(frozen=True)
class WeightSizes:
    """Bytes of the models in the chosen storage."""

    expert: float
    nonblock: float  # embeddings, time/text embedders, head: what the block plan keeps resident
    block: float
    experts: int
    text_encoder: float
    vae: float
    layers: int = 40


@dataclass(frozen=True)
class Option:
    """One candidate placement."""

    offload: str
    text: str
    tiling: bool
    batch: bool = True
    chunk: int = 0
    host: str = "pinned"

    @property
    def cost(self) -> float:
        return (COSTS[("offload", self.offload)] + COSTS[("host", self.host)] + COSTS[("text", self.text)] + COSTS[("batch", self.batch)]
                + COSTS[("tiling", self.tiling)] + CHUNK_COST.get(self.chunk, 4.0))


@dataclass(frozen=True)
class Phases:
    """Expected allocator peak of each phase of a case (the resident weights included)."""

    text: float
    encode: float
    denoise: float
    decode: float

    @property
    def peak(self) -> float:
        return max(self.text, self.encode, self.denoise, self.decode)


def weight_sizes(sizes: ModelSizes, dtype: str, weights_format: str = "bf16") -> WeightSizes:
    """Expert, block and non-block bytes; fp8 stores block Linear weights in 1 byte plus a float32 scale per row."""
    nbytes = sz.DTYPE_BYTES[dtype]
    d, layers = sizes.dim, sizes.num_layers
    block_fp32 = 8 * d if sizes.fp32_params else 0  # modulation table and norm2 stay float32
    block = float(sizes.block_params * nbytes + block_fp32 * (4 - nbytes))
    if weights_format == "fp8":
        linear, rows = sz.block_linear_shape(d, sizes.ffn_dim)
        block -= linear * (nbytes - 1) - rows * 4
    other = max(sizes.expert_params - layers * sizes.block_params, 0)
    nonblock = float(other * nbytes + max(sizes.fp32_params - layers * block_fp32, 0) * (4 - nbytes))
    return WeightSizes(nonblock + layers * block, nonblock, block, sizes.experts, float(sizes.text_encoder_params * nbytes), float(sizes.vae_bytes), layers)


def resident_weights(ws: WeightSizes, offload: str) -> float:
    """Expert bytes on the GPU at once under each offload mode, while denoising."""
    return {"none": ws.experts * ws.expert, "expert": ws.expert, "block": ws.experts * ws.nonblock + STREAMED_BLOCKS * ws.block}[offload]


def phases_of(ws: WeightSizes, sizes: ModelSizes, load: Workload, dtype: str, option: Option) -> Phases:
    """Expected allocator peak per phase: the weights resident then, plus that phase's working memory."""
    nbytes = sz.DTYPE_BYTES[dtype]
    tile = VAE_TILE_PIXELS if option.tiling else None
    # While text and media encode the first expert is brought in (expert plan); block plan: the last case's blocks may remain.
    early = (ws.expert if option.offload == "expert" else resident_weights(ws, option.offload)) + ws.vae
    resident = resident_weights(ws, option.offload) + ws.vae
    encode = sz.vae_bytes(load.source_pixels, load.source_frames, sizes, tile) if load.source_pixels else 0.0
    return Phases(
        text=early + sz.text_bytes(sizes, nbytes, option.text),
        encode=early + encode,
        denoise=resident + sz.denoise_bytes(load, sizes, nbytes, option.batch, option.chunk),
        decode=resident + sz.vae_bytes(load.pixels, load.frames, sizes, tile),
    )


def gpu_need(ws: WeightSizes, sizes: ModelSizes, load: Workload, dtype: str, option: Option) -> float:
    """GPU bytes the option must have: its expected peak plus the reserve."""
    return phases_of(ws, sizes, load, dtype, option).peak + GPU_RESERVE


def pool_blocks(ws: WeightSizes, option: Option, host_room: float | None) -> int:
    """Pinned block buffers of a block plan's host placement (0: every block of every expert has its own)."""
    if option.offload != "block" or option.host == "pinned":
        return 0
    if option.host == "one":
        return ws.layers + SPARE_BLOCKS
    if host_room is None:
        return DISK_BLOCKS
    spare = host_room - sz.HOST_RESERVE - ws.text_encoder
    return int(min(max(spare // ws.block, DISK_BLOCKS), ws.layers + SPARE_BLOCKS - 1))


def host_need(ws: WeightSizes, option: Option, blocks: int = 0) -> float:
    """Host memory the placement holds: pinned expert copies (or block buffers) and UMT5, beside the process itself."""
    if option.offload == "none":
        experts = 0.0
    elif option.offload == "expert":
        experts = ws.experts * ws.expert
    else:
        experts = ws.experts * (ws.expert - ws.nonblock) if option.host == "pinned" else (blocks or DISK_BLOCKS) * ws.block
    return sz.HOST_RESERVE + experts + ws.text_encoder


def candidates(offload: str, t5_cpu: bool, vae_tiling: bool | None, batch_passes: bool = True, streamable: bool = True) -> list[Option]:
    """Every placement the flags allow, cheapest first (ties in the order offload, host, text, batching, chunking, tiling).

    UMT5 never stays on the GPU (its memory is worth more to experts and activations than one pinned copy per case).
    streamable: the expert files hold the weights as they run (a plain checkpoint for bf16, `bernini convert` output
    for fp8), so a block plan may read them back from disk instead of keeping every expert pinned.
    """
    offloads = OFFLOADS if offload == "auto" else (offload,)
    tilings = (False, True) if vae_tiling is None else (vae_tiling,)
    batches = (True, False) if batch_passes else (False,)
    texts = ("cpu",) if t5_cpu else TEXT_PLACES  # 1024 tokens through UMT5-XXL on the CPU: tens of seconds a case
    options = []
    for o in offloads:
        hosts = (HOST_PLACES if streamable else ("pinned",)) if o == "block" else ("pinned",)
        options += [Option(o, t, v, b, c, h) for h in hosts for t in texts for b in batches for c in CHUNKS for v in tilings]
    return sorted(options, key=lambda option: option.cost)  # stable: equal costs keep the listing order


@dataclass(frozen=True)
class Room:
    """What a plan may use: GPU bytes (the headroom already taken off) and host bytes; None: unknown."""

    gpu: float | None
    host: float | None
    capped: bool = False  # the GPU figure is --max_gpu_memory, not what the card has free


def fits_in(need: float, have: float | None) -> bool | None:
    return None if have is None else need <= have


@dataclass(frozen=True)
class Judge:
    """Verdicts on options for one workload, weight format and room."""

    sizes: ModelSizes
    load: Workload
    dtype: str
    ws: WeightSizes
    room: Room

    def gpu(self, option: Option) -> float:
        return gpu_need(self.ws, self.sizes, self.load, self.dtype, option)

    def host(self, option: Option) -> float:
        return host_need(self.ws, option, pool_blocks(self.ws, option, self.room.host))

    def viable(self, option: Option) -> bool | None:
        gpu, host = fits_in(self.gpu(option), self.room.gpu), fits_in(self.host(option), self.room.host)
        if gpu is False or host is False:
            return False
        return None if gpu is None or host is None else True

    def first(self, options: list[Option]) -> Option | None:
        return next((o for o in options if self.viable(o)), None)


def prefetch_bytes(ws: WeightSizes, sizes: ModelSizes, load: Workload, dtype: str, option: Option, usable: float | None) -> float:
    """Expert plan: what of the incoming expert fits beside the outgoing one and the last step's activations."""
    if option.offload != "expert" or ws.experts < 2 or usable is None:
        return 0.0  # unknown free memory: copy at the switch, never risk an out-of-memory
    return float(min(max(usable - GPU_RESERVE - switch_need(ws, sizes, load, dtype, option) - PREFETCH_MARGIN, 0.0), ws.expert))


def switch_need(ws: WeightSizes, sizes: ModelSizes, load: Workload, dtype: str, option: Option) -> float:
    """GPU bytes in use during the last step before an expert switch (before any prefetch)."""
    return phases_of(ws, sizes, load, dtype, option).denoise
