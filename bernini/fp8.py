"""FP8 weight storage for the transformer blocks' Linear layers (opt-in, lossy): e4m3 weights, per-channel scales."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row still gets a usable scale


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn weight, float32 scale per output channel = amax / 448)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize` (up to the rounding it did), in ``dtype``."""
    return (weight.float() * scale[:, None]).to(dtype)


@functools.cache
def scaled_mm_supported(device: torch.device) -> bool:
    """True where torch._scaled_mm runs row-wise scaled e4m3 products (CUDA, compute capability >= 8.9)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:  # some builds lack row-wise scaling: probe once on a tiny product
        a = torch.zeros(16, 16, device=device, dtype=FP8)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, TypeError) as exc:
        log.warning("torch._scaled_mm with row-wise scales is unavailable (%s); FP8 weights are dequantized per call", exc)
        return False


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ fp8 weight^T with per-token dynamic activation scales; bf16 result."""
    rows = x.reshape(-1, x.shape[-1])
    # One reduction, no |x| temporary; the scale is rounded to the activation dtype so the product undoes it exactly.
    x_scale = (torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    x8 = (rows / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # e4m3fn has no inf; not every backend saturates
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale.float(), scale_b=scale[None, :], out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


class FP8Linear(nn.Module):
    """nn.Linear with its weight in float8_e4m3fn and a float32 scale per output channel; the bias keeps its dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, use_scaled_mm: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # _scaled_mm needs both matrix sides to be multiples of 16; bf16 activations only.
        self.use_scaled_mm = use_scaled_mm and self.in_features % 16 == 0 and self.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_scaled_mm: bool = False) -> FP8Linear:
        weight, scale = quantize(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, use_scaled_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and x.dtype == torch.bfloat16 and x.is_cuda:
            return _scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)
        # e4m3 values are exact in bf16/fp32, so the cast is lossless; the scale is applied per output column.
        out = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scaled_mm={self.use_scaled_mm}"


def quantize_linears(module: nn.Module, use_scaled_mm: bool = False) -> int:
    """Swap every nn.Linear inside ``module`` for an FP8Linear in place; returns how many were swapped."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FP8Linear.from_linear(linear, use_scaled_mm))
    return len(targets)


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the Linear weights (and FP8 scales) inside ``module``, to compare storage formats."""
    total = 0
    for child in module.modules():
        if isinstance(child, nn.Linear):
            total += child.weight.numel() * child.weight.element_size()
        elif isinstance(child, FP8Linear):
            total += child.weight.numel() * child.weight.element_size() + child.weight_scale.numel() * 4
    return total
