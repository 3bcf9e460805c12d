"""What a run weighs before loading: parameter counts from the configs, the bytes each phase holds on the GPU, free memory.

Every estimate is an allocator peak (what ``torch.cuda.max_memory_allocated`` reports) in eager mode; the plan adds
its reserve on top. WHOLE_FACTOR, TEXT_WORK and the VAE factors are fitted to the H100 and H200 measurements of
docs/performance.md; CHUNKED_FACTOR and RUN_FACTOR count what the chunked code allocates (tests/test_memory_12gb.py
counts it on meta tensors; its CUDA test measures it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bernini.plan import CasePlan

GB = 1e9  # decimal, as model cards quote sizes (28.6 GB per bf16 A14B expert)
GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
HOST_RESERVE = 4.0 * GB  # Python, torch and the CUDA libraries, the media being decoded, the decoded frames
OS_RESERVE = 2 * GiB  # of --host_memory: what the system and other programs keep
VAE_CHUNK_FRAMES = 4  # the Wan VAE decodes one latent frame (4 pixel frames) at a time
VAE_WORK_FACTOR = 15  # float32 96-channel feature maps live per pixel of a VAE chunk (9.2 GiB untiled at 480p, 81 frames)
VAE_TILED_FACTOR = 10  # the same for one 256 x 256 tile (tiles overlap and their outputs are kept for blending)
VAE_CLIP_COPIES = 3  # the decoded clip in float32 and the two copies that scale it to [0, 1]
# [rows, dim] tensors live at an unchunked block's peak (float32 norm/RoPE chains, q/k/v, attention): 14.5 measured with
# separate q/k/v projections (counted 12 on meta tensors), plus the 2 the fused QKV adds to the count (its [rows, 3 * dim]
# output stays alive beside the normed q and k): re-measure with benchmarks/bench_memory.py.
WHOLE_FACTOR = 16.5
CHUNKED_FACTOR = 3  # a chunked forward: its input, updated in place, and a block's whole keys and values
# [run, dim] tensors live at a run's peak: its float32 RoPE and modulation chains (10), attention's layouts (2), the fused
# QKV GEMM's [run, 3 * dim] output (3; counted 15.01 with allocator rounding, hence the half).
RUN_FACTOR = 15.5
TEXT_WORK = 0.8 * GiB  # UMT5 activations for the two 512-token prompts (attention scores, gated FFN) and the caching pool's slack


def block_params(dim: int, ffn_dim: int) -> int:
    """Parameters of one Wan DiT block: self and cross attention (q, k, v, out with biases, q/k RMS norms), norm2, FFN, modulation."""
    attention = 4 * (dim * dim + dim) + 2 * dim
    return 2 * attention + 2 * dim + (dim * ffn_dim + ffn_dim + ffn_dim * dim + dim) + 6 * dim


def block_linear_shape(dim: int, ffn_dim: int) -> tuple[int, int]:
    """(weights, output rows) of a block's Linear layers: what FP8 stores in one byte, with one float32 scale per row."""
    return 8 * dim * dim + 2 * dim * ffn_dim, 9 * dim + ffn_dim


def transformer_params(cfg: Mapping[str, Any]) -> int:
    """Exact parameter count of one Wan DiT expert from its diffusers config.json."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    patch = math.prod(cfg.get("patch_size", (1, 2, 2)))
    embed = cfg["in_channels"] * patch * d + d
    time = cfg["freq_dim"] * d + d + d * d + d + 6 * d * d + 6 * d
    text = cfg["text_dim"] * d + d + d * d + d
    head = d * cfg["out_channels"] * patch + cfg["out_channels"] * patch + 2 * d
    return cfg["num_layers"] * block_params(d, cfg["ffn_dim"]) + embed + time + text + head


def transformer_fp32_params(cfg: Mapping[str, Any]) -> int:
    """Of those, the ones kept in float32 (WanTransformer.keep_fp32: time embedder, modulation tables, norm2)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    time_embedder = cfg["freq_dim"] * d + d + d * d + d
    return time_embedder + 2 * d + cfg["num_layers"] * (6 * d + 2 * d)


def umt5_encoder_params(cfg: Mapping[str, Any]) -> int:
    """Parameter count of a (U)MT5 encoder (embeddings + layers) from its config.json."""
    d, layers = cfg["d_model"], cfg["num_layers"]
    return umt5_embedding_params(cfg) + layers * umt5_layer_params(cfg) + d + (0 if _per_layer_bias(cfg) else _bias(cfg))


def umt5_embedding_params(cfg: Mapping[str, Any]) -> int:
    return cfg["vocab_size"] * cfg["d_model"]


def umt5_layer_params(cfg: Mapping[str, Any]) -> int:
    d, inner = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"]
    gated = str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    return 4 * d * inner + (3 if gated else 2) * d * cfg["d_ff"] + 2 * d + (_bias(cfg) if _per_layer_bias(cfg) else 0)


def _per_layer_bias(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type", "umt5") == "umt5"  # UMT5: a position bias in every layer


def _bias(cfg: Mapping[str, Any]) -> int:
    return cfg.get("relative_attention_num_buckets", 32) * cfg["num_heads"]


@dataclass(frozen=True)
class ModelSizes:
    """What the weights weigh, from the configs of the resolved base folder."""

    expert_params: int
    experts: int
    text_encoder_params: int
    vae_bytes: int
    dim: int
    ffn_dim: int
    num_layers: int
    text_tokens: int = 512
    vae_base_dim: int = 96
    fp32_params: int = 0  # of expert_params, kept in float32
    text_unit_params: int = 0  # the largest piece of UMT5 that visits the GPU at once when it streams (its embedding)

    @property
    def block_params(self) -> int:
        return block_params(self.dim, self.ffn_dim)


@dataclass(frozen=True)
class Workload:
    """The largest case: rows of its largest (batched) forward, the sequences it keeps, frame pixels.

    tokens: rows of the largest forward (passes batched). sequence: the longest pass (0: single_tokens, else tokens).
    target / conditions: the target tokens and the condition tokens of every layout a case embeds once and keeps
    (0: unknown, sized as if the longest pass were all condition tokens).
    """

    tokens: int
    pixels: int
    frames: int
    single_tokens: int = 0  # the largest guidance pass alone (0: as tokens), what the plan needs with passes one at a time
    sequence: int = 0
    target: int = 0
    conditions: int = 0
    source_pixels: int = 0  # the largest source video the VAE encodes (0: none)
    source_frames: int = 0
    max_side: int = 0  # the largest side of the largest case, to say which --max_image_size would fit

    @property
    def unbatched_tokens(self) -> int:
        return self.single_tokens or self.tokens

    @property
    def longest(self) -> int:
        return self.sequence or self.unbatched_tokens

    def scaled(self, factor: float, frames: int | None = None) -> Workload:
        """The same case with every side scaled by ``factor`` (tokens and pixels by its square), or ``frames`` frames."""
        area = factor * factor
        time = 1.0 if frames is None else ((frames - 1) // 4 + 1) / ((self.frames - 1) // 4 + 1)
        per_token = area * time

        def tok(n: int) -> int:
            return int(n * per_token)

        return Workload(tok(self.tokens), int(self.pixels * area), frames or self.frames, tok(self.single_tokens), tok(self.sequence), tok(self.target),
                        tok(self.conditions), int(self.source_pixels * area), frames or self.source_frames, int(self.max_side * factor))


def workload_of(plans: Sequence[CasePlan], batch_passes: bool = True) -> Workload:
    """The largest case's forward: equal-length passes run as one batch (--batch_passes), its longest pass, what it keeps."""
    tokens = single = pixels = target = conditions = source_pixels = source_frames = side = 0
    frames = 1
    for p in plans:
        groups = Counter(p.tokens_per_forward)
        single = max(single, max(p.tokens_per_forward))
        tokens = max(tokens, max(n * count for n, count in groups.items()) if batch_passes else max(p.tokens_per_forward))
        case_target = p.grid[0] * p.grid[1] * p.grid[2]
        target = max(target, case_target)
        conditions = max(conditions, sum(n - case_target for n in groups))  # one layout per length: each embeds its sources once
        for m in (p, *p.sources):
            pixels = max(pixels, m.width * m.height)
            side = max(side, m.width, m.height)
        for m in p.sources:
            if m.kind == "video" and m.width * m.height * m.frames > source_pixels * source_frames:
                source_pixels, source_frames = m.width * m.height, m.frames
        frames = max(frames, p.frames)
    return Workload(tokens, pixels, frames, single, single, target, conditions, source_pixels, source_frames, side)


# --------------------------------------------------------------------------- what each phase holds on the GPU


def text_kv_bytes(sizes: ModelSizes, dtype_bytes: int, prompts: int = 2) -> float:
    """Cross-attention K/V of every block for both prompts, kept for the case."""
    return sizes.num_layers * 2 * prompts * sizes.text_tokens * sizes.dim * dtype_bytes


def forward_bytes(rows: int, sizes: ModelSizes, dtype_bytes: int, chunk_tokens: int = 0) -> float:
    """The peak of one forward over ``rows`` tokens (passes batched), beyond its input; chunk_tokens > 0: chunked blocks."""
    unit = sizes.dim * dtype_bytes
    if not chunk_tokens or chunk_tokens >= rows:
        return WHOLE_FACTOR * rows * unit
    run = -(-rows // -(-rows // chunk_tokens))  # equal runs (bernini.models.transformer.token_spans)
    return CHUNKED_FACTOR * rows * unit + RUN_FACTOR * run * unit


def kept_bytes(load: Workload, sizes: ModelSizes, dtype_bytes: int) -> float:
    """What the denoise loop keeps beside a forward: the packed input of the longest pass, the target and condition tokens."""
    unit = sizes.dim * dtype_bytes
    sequence = load.longest
    # Unknown: as if the longest pass were half target, half condition tokens (v2v's shape: the most it can keep).
    target, conditions = (load.target, load.conditions) if load.target else (sequence // 2, sequence - sequence // 2)
    rope = 2 * 64 * 4 * (sequence + conditions)  # float32 cos/sin per layout, head_dim / 2 = 64 angles a token
    return (sequence if conditions else 0) * unit + (target + conditions) * unit + rope


def denoise_bytes(load: Workload, sizes: ModelSizes, dtype_bytes: int, batch: bool, chunk_tokens: int = 0) -> float:
    """DiT working memory at the largest step: the forward, what the loop keeps, the text K/V."""
    rows = load.tokens if batch else load.unbatched_tokens
    return forward_bytes(rows, sizes, dtype_bytes, chunk_tokens) + kept_bytes(load, sizes, dtype_bytes) + text_kv_bytes(sizes, dtype_bytes)


def vae_bytes(pixels: int, frames: int, sizes: ModelSizes, tile_pixels: int | None = None) -> float:
    """One causal VAE chunk in float32 (a tile of it when tiled), plus the clip in float32 and its copies."""
    chunk = VAE_CHUNK_FRAMES * sizes.vae_base_dim * 4
    work = chunk * (VAE_WORK_FACTOR * pixels if tile_pixels is None else VAE_TILED_FACTOR * min(pixels, tile_pixels))
    return work + VAE_CLIP_COPIES * frames * pixels * 3 * 4


def text_bytes(sizes: ModelSizes, dtype_bytes: int, text: str) -> float:
    """UMT5 on the GPU while it encodes: whole (visit), its largest piece (stream: one piece at a time), nothing (cpu)."""
    if text == "cpu":
        return 0.0
    whole = sizes.text_encoder_params * dtype_bytes
    if text == "visit":
        return whole + TEXT_WORK
    unit = (sizes.text_unit_params or sizes.text_encoder_params // 4) * dtype_bytes
    return min(unit, whole) + TEXT_WORK


# --------------------------------------------------------------------------- reading the configs and the machine


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def read_sizes(base: Path, experts: int = 2, text_tokens: int = 512) -> ModelSizes:
    """ModelSizes from <base>/transformer, text_encoder and vae configs (file sizes as a fallback)."""
    tcfg = _read_json(base / "transformer" / "config.json")
    if tcfg is None:
        raise ValueError(f"{base / 'transformer' / 'config.json'} is missing or unreadable; cannot estimate memory")
    ecfg = _read_json(base / "text_encoder" / "config.json")
    try:
        text_params, text_unit = (umt5_encoder_params(ecfg), umt5_embedding_params(ecfg)) if ecfg else (0, 0)
    except KeyError:
        text_params, text_unit = 0, 0
    if not text_params:  # no usable config: bf16 bytes on disk / 2 is close enough
        text_params = _folder_bytes(base / "text_encoder") // 2
    vcfg = _read_json(base / "vae" / "config.json") or {}
    return ModelSizes(
        expert_params=transformer_params(tcfg),
        experts=experts,
        text_encoder_params=text_params,
        vae_bytes=_folder_bytes(base / "vae"),
        dim=tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
        ffn_dim=tcfg["ffn_dim"],
        num_layers=tcfg["num_layers"],
        text_tokens=text_tokens,
        vae_base_dim=vcfg.get("base_dim", 96),
        fp32_params=transformer_fp32_params(tcfg),
        text_unit_params=text_unit,
    )


def host_free_bytes() -> float | None:
    """Available host memory: psutil if present, else /proc/meminfo."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_room(free: float | None, host_memory: float | None) -> float | None:
    """Host bytes a plan may hold: what is free, at most --host_memory GiB less what the system keeps."""
    cap = None if host_memory is None else max(host_memory * GiB - OS_RESERVE, 0.0)
    if free is None:
        return cap
    return free if cap is None else min(free, cap)


def gpu_free_bytes(device: str) -> float | None:
    """Free memory of the CUDA device, or None (no CUDA, or not a CUDA device)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    except RuntimeError:
        return None
