"""Memory estimate before loading: weights, activations and the flags that would make a run fit."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bernini.plan import CasePlan

log = logging.getLogger(__name__)

GB = 1e9  # decimal, as model cards quote sizes (28.6 GB per bf16 A14B expert)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GPU_RESERVE = 1.5 * GB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HOST_RESERVE = 4.0 * GB  # Python, torch, the media being decoded
RESIDENT_BLOCKS = 2  # --offload block keeps about this many blocks on the GPU at once
VAE_CHUNK_FRAMES = 4  # the Wan VAE decodes one latent frame (4 pixel frames) at a time
VAE_WORK_FACTOR = 6  # live feature maps per full-resolution channel during a VAE chunk
FLAG_SETS: tuple[tuple[str, bool], ...] = (("none", False), ("none", True), ("expert", False), ("expert", True), ("block", False), ("block", True))


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


@dataclass(frozen=True)
class Workload:
    """The largest case: tokens of one batched forward, and frame pixels of the largest frame."""

    tokens: int
    pixels: int
    frames: int


@dataclass(frozen=True)
class Placement:
    """Where the weights sit for one choice of --offload / --t5_cpu, and what that needs."""

    offload: str
    t5_cpu: bool
    gpu_bytes: float
    host_bytes: float

    @property
    def flags(self) -> str:
        parts = [f"--offload {self.offload}"] + (["--t5_cpu"] if self.t5_cpu else [])
        return " ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component, the requested placement, free memory, and flags that would fit."""

    dtype: str
    on_gpu: bool
    expert_bytes: float
    experts: int
    text_encoder_bytes: float
    vae_bytes: float
    activation_bytes: float
    vae_work_bytes: float
    placement: Placement
    gpu_free: float | None
    host_free: float | None
    fits: bool | None  # None: free memory unknown
    suggestions: tuple[str, ...]


def transformer_params(cfg: Mapping[str, Any]) -> int:
    """Exact parameter count of one Wan DiT expert from its diffusers config.json."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, patch = cfg["ffn_dim"], math.prod(cfg.get("patch_size", (1, 2, 2)))
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, out with biases; RMS norms on q and k
    block = 2 * attention + 2 * d + (d * f + f + f * d + d) + 6 * d  # self, cross, norm2, FFN, modulation
    embed = cfg["in_channels"] * patch * d + d
    time = cfg["freq_dim"] * d + d + d * d + d + 6 * d * d + 6 * d
    text = cfg["text_dim"] * d + d + d * d + d
    head = d * cfg["out_channels"] * patch + cfg["out_channels"] * patch + 2 * d
    return cfg["num_layers"] * block + embed + time + text + head


def umt5_encoder_params(cfg: Mapping[str, Any]) -> int:
    """Parameter count of a (U)MT5 encoder (embeddings + layers) from its config.json."""
    d, layers = cfg["d_model"], cfg["num_layers"]
    inner = cfg["num_heads"] * cfg["d_kv"]
    gated = str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    per_layer_bias = cfg.get("model_type", "umt5") == "umt5"  # UMT5: a position bias in every layer
    bias = cfg.get("relative_attention_num_buckets", 32) * cfg["num_heads"]
    layer = 4 * d * inner + (3 if gated else 2) * d * cfg["d_ff"] + 2 * d + (bias if per_layer_bias else 0)
    return cfg["vocab_size"] * d + layers * layer + d + (0 if per_layer_bias else bias)


def activation_bytes(tokens: int, sizes: ModelSizes, dtype_bytes: int) -> float:
    """Peak DiT working set: tokens x dim x bytes x a small factor, attention, and the text K/V cache."""
    d, f = sizes.dim, sizes.ffn_dim
    block = (6 * d + 2 * f) * dtype_bytes  # residual, normed copy, float32 copies, FFN hidden + GELU
    attention = 3 * d * dtype_bytes + 2 * d * 4  # q/k/v plus float32 RoPE temporaries; no L x L matrix
    text_kv = sizes.num_layers * 2 * sizes.text_tokens * d * dtype_bytes * 2  # both prompts, every block
    return tokens * (block + attention) + text_kv


def vae_work_bytes(load: Workload, sizes: ModelSizes) -> float:
    """One causal VAE chunk at full resolution in float32, plus the decoded clip."""
    chunk = VAE_CHUNK_FRAMES * load.pixels * sizes.vae_base_dim * 4 * VAE_WORK_FACTOR
    return chunk + load.frames * load.pixels * 3 * 4


def place(sizes: ModelSizes, expert: float, text: float, work: float, offload: str, t5_cpu: bool, on_gpu: bool) -> Placement:
    """GPU and host bytes for one placement; on the CPU everything is host memory."""
    total_experts = sizes.experts * expert
    if offload == "expert":
        gpu_experts = expert
    elif offload == "block":
        gpu_experts = expert * RESIDENT_BLOCKS / max(sizes.num_layers, 1)
    else:
        gpu_experts = total_experts
    gpu = gpu_experts + (0 if t5_cpu else text) + sizes.vae_bytes + work + GPU_RESERVE
    host = (total_experts - gpu_experts) + (text if t5_cpu else 0) + HOST_RESERVE
    if not on_gpu:
        return Placement("none", False, 0.0, total_experts + text + sizes.vae_bytes + work + HOST_RESERVE)
    return Placement(offload, t5_cpu, gpu, host)


def _fits(p: Placement, gpu_free: float | None, host_free: float | None, on_gpu: bool) -> bool | None:
    if (on_gpu and gpu_free is None) or host_free is None:
        return None
    return (not on_gpu or p.gpu_bytes <= gpu_free) and p.host_bytes <= host_free  # type: ignore[operator]


def estimate(
    sizes: ModelSizes,
    load: Workload,
    *,
    dtype: str,
    offload: str = "none",
    t5_cpu: bool = False,
    on_gpu: bool = True,
    gpu_free: float | None = None,
    host_free: float | None = None,
) -> MemoryEstimate:
    """Pure arithmetic: what the run needs where, whether it fits, and which flags would make it fit."""
    nbytes = DTYPE_BYTES[dtype]
    expert = sizes.expert_params * nbytes
    text = sizes.text_encoder_params * nbytes
    act = activation_bytes(load.tokens, sizes, nbytes)
    vae_work = vae_work_bytes(load, sizes)
    work = max(act, vae_work)  # the VAE runs before and after the DiT, never with it
    options = [place(sizes, expert, text, work, o, t, on_gpu) for o, t in FLAG_SETS if t or not t5_cpu]
    fitting = [p for p in options if _fits(p, gpu_free, host_free, on_gpu)]
    if offload == "auto":  # the first (fastest) placement that fits; 'none' when free memory is unknown
        chosen = fitting[0] if fitting else options[0] if _fits(options[0], gpu_free, host_free, on_gpu) is None else options[-1]
    else:
        chosen = place(sizes, expert, text, work, offload, t5_cpu, on_gpu)
    fits = _fits(chosen, gpu_free, host_free, on_gpu)
    suggestions: list[str] = []
    if fits is False:
        suggestions = [p.flags for p in fitting if on_gpu][:2]
        if not suggestions:
            suggestions = [f"lower --max_image_size / --num_frames (the largest case needs {act / GB:.1f} GB of activations for {load.tokens} tokens)"]
    return MemoryEstimate(dtype, on_gpu, expert, sizes.experts, text, sizes.vae_bytes, act, vae_work, chosen, gpu_free, host_free, fits, tuple(suggestions))


def format_estimate(est: MemoryEstimate) -> str:
    """A few lines for the log and the dry run."""

    def gb(x: float | None) -> str:
        return "unknown" if x is None else f"{x / GB:.1f} GB"

    where = f"GPU {gb(est.placement.gpu_bytes)} of {gb(est.gpu_free)} free, " if est.on_gpu else ""
    verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[est.fits]
    lines = [
        f"memory estimate ({est.dtype}): experts {est.experts} x {gb(est.expert_bytes)}, text encoder {gb(est.text_encoder_bytes)}, "
        f"VAE {gb(est.vae_bytes)}, activations {gb(est.activation_bytes)}, VAE work {gb(est.vae_work_bytes)}",
        f"  with {est.placement.flags if est.on_gpu else 'everything on the CPU'}: {where}host {gb(est.placement.host_bytes)} of {gb(est.host_free)} free -> {verdict}",
    ]
    lines += [f"  would fit with: {s}" for s in est.suggestions]
    return "\n".join(lines)


def workload_of(plans: Sequence[CasePlan], batch_combos: bool = True) -> Workload:
    """The largest case's batched forward: equal-length combos run as one batch (--batch_combos)."""
    tokens, pixels, frames = 0, 0, 1
    for p in plans:
        groups = Counter(p.tokens_per_forward)
        batch = max(n * count for n, count in groups.items()) if batch_combos else max(p.tokens_per_forward)
        tokens = max(tokens, batch)
        for m in (p, *p.sources):
            pixels = max(pixels, m.width * m.height)
        frames = max(frames, p.frames)
    return Workload(tokens, pixels, frames)


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
        text_params = umt5_encoder_params(ecfg) if ecfg else 0
    except KeyError:
        text_params = 0
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


def estimate_run(base: Path, experts: int, plans: Sequence[CasePlan], runtime: Any, text_tokens: int = 512) -> MemoryEstimate:
    """The estimate for a planned batch with the run's RuntimeConfig and this machine's free memory."""
    sizes = read_sizes(base, experts, text_tokens)
    on_gpu = str(runtime.device).startswith("cuda")
    return estimate(
        sizes,
        workload_of(plans, runtime.batch_combos),
        dtype=runtime.dtype,
        offload=runtime.offload,
        t5_cpu=runtime.t5_cpu,
        on_gpu=on_gpu,
        gpu_free=gpu_free_bytes(str(runtime.device)),
        host_free=host_free_bytes(),
    )
