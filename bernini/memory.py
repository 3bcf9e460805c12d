"""What a run weighs before loading: parameter counts from the configs, activation and VAE arithmetic, free memory.

bernini.offload.plan turns these into the memory plan."""

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
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GPU_RESERVE = 1.5 * GB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HOST_RESERVE = 4.0 * GB  # Python, torch, the media being decoded
VAE_CHUNK_FRAMES = 4  # the Wan VAE decodes one latent frame (4 pixel frames) at a time
VAE_WORK_FACTOR = 6  # live feature maps per full-resolution channel during a VAE chunk


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
    """The largest case: tokens of one (batched) forward and of the largest single pass, frame pixels of the largest frame."""

    tokens: int
    pixels: int
    frames: int
    single_tokens: int = 0  # the largest guidance pass alone (0: as tokens), what the plan needs with combos one at a time

    @property
    def unbatched_tokens(self) -> int:
        return self.single_tokens or self.tokens


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


def workload_of(plans: Sequence[CasePlan], batch_combos: bool = True) -> Workload:
    """The largest case's forward: equal-length combos run as one batch (--batch_combos), and its largest single pass."""
    tokens, single, pixels, frames = 0, 0, 0, 1
    for p in plans:
        groups = Counter(p.tokens_per_forward)
        single = max(single, max(p.tokens_per_forward))
        tokens = max(tokens, max(n * count for n, count in groups.items()) if batch_combos else max(p.tokens_per_forward))
        for m in (p, *p.sources):
            pixels = max(pixels, m.width * m.height)
        frames = max(frames, p.frames)
    return Workload(tokens, pixels, frames, single)


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
