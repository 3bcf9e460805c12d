"""Shared benchmark helpers: full-size random experts on the GPU, CUDA-event timing, FLOP counts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from bernini.models import TransformerConfig, WanTransformer

A14B = TransformerConfig()  # the Wan2.2-T2V-A14B expert: 40 layers, dim 5120, 40 heads, FFN 13824


def forward_flops(tokens: int, cfg: TransformerConfig = A14B, text: int = 512) -> float:
    """FLOP of one forward over `tokens` video tokens (the formula of docs/performance.md)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 8 * d * d * tokens + 4 * tokens * tokens * d + 4 * d * d * tokens + 4 * tokens * text * d + 4 * d * f * tokens
    return cfg.num_layers * per_layer


def random_expert(cfg: TransformerConfig = A14B, device: str = "cuda", seed: int = 0) -> WanTransformer:
    """Built on the meta device, materialized on the GPU and filled with random values (never zeros)."""
    with torch.device("meta"):
        model = WanTransformer(cfg)
    for name, p in model.named_parameters():  # final dtypes while still on meta: the GPU only ever holds the bf16 model
        p.data = p.data.to(torch.float32 if any(part in WanTransformer.keep_fp32 for part in name.split(".")) else torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            scale = 1.0 / fan_in**0.5 if p.ndim > 1 else 0.02
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm2.weight"):
                data, scale = data * 0.05 + 1.0, 1.0
            p.copy_(data * scale)
    return model.eval().requires_grad_(False)


def time_cuda(fn: Callable[[], object], warmup: int = 1, repeat: int = 3) -> tuple[float, list[float]]:
    """Median seconds of `repeat` timed calls after `warmup` calls, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), times


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def write_json(path: str | None, data: object) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def device_name() -> str:
    return f"{torch.cuda.get_device_name()} / torch {torch.__version__} / CUDA {torch.version.cuda}"
