"""FP8 for the transformer blocks' Linear layers (opt-in, lossy): e4m3 weight storage, and FP8 GEMMs for speed.

Two ways to compute a block Linear in FP8 (``--fp8_gemm``), both with dynamic per-row (per-token) activation
scales and per-output-channel weight scales: our FP8Linear over ``torch._scaled_mm`` ("scaled_mm"), and
torchao's float8 inference path ("torchao", ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row still gets a usable scale
KEEP_FP32 = ("weight_scale",)  # loading `bernini convert --weights fp8` files: the per-row scales stay float32


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

    @classmethod
    def concat(cls, parts: tuple[FP8Linear, ...]) -> FP8Linear:
        """One layer whose output rows are the parts' in order: exact, as scales are per row (the fused QKV of FP8 files)."""
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]), bias, parts[0].use_scaled_mm)

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


# --------------------------------------------------------------------------- FP8 GEMMs (--fp8_gemm)

# "auto" picks the first usable. torchao measured faster on an H200 (1.20x vs 1.15x per forward at 33,390
# tokens, docs/performance.md) but needs the experts resident; ours works with every offload plan.
GEMM_BACKENDS = ("torchao", "scaled_mm")


@dataclass(frozen=True)
class GemmPolicy:
    """Which block Linears compute in FP8; the others keep the model's dtype.

    ``keep_blocks``: block indices kept whole (negative counts from the end); ``keep_layers``: dotted names
    inside a block. The text K/V projections run once per case (no time to win), so they always stay.
    """

    keep_blocks: tuple[int, ...] = (0, -1)  # the first and last block: where the input enters and the prediction leaves
    keep_layers: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")

    def selects(self, index: int, count: int, name: str) -> bool:
        kept = {i % count for i in self.keep_blocks}
        return index not in kept and name not in self.keep_layers


DEFAULT_POLICY = GemmPolicy()


def _torchao() -> object:
    return importlib.import_module("torchao.quantization")


def gemm_unusable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can compute FP8 GEMMs on ``device``, else why not."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"unknown --fp8_gemm {backend!r}; choose one of: off, auto, {', '.join(GEMM_BACKENDS)}")
    if device.type != "cuda":
        return "needs a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"needs FP8 tensor cores (compute capability >= 8.9; this card is {cap[0]}.{cap[1]})"
    if not scaled_mm_supported(device):
        return "torch._scaled_mm with row-wise scales is unavailable in this torch build"
    if backend == "torchao":
        try:
            _torchao()
        except Exception as exc:  # ImportError, or a build for another torch
            return f"torchao is not installed ({type(exc).__name__}: {exc}); pip install torchao"
    return None


def select_gemm(name: str, device: torch.device | str, resident: bool = True) -> str | None:
    """Resolve --fp8_gemm once: None = exact GEMMs. 'auto' falls back to them with a warning; a named backend must work.

    ``resident``: both experts stay on the GPU (offload none); torchao converts modules in place and cannot stream.
    """
    device = torch.device(device)
    if name == "off":
        return None
    if name == "auto":
        reasons = {b: gemm_unusable(b, device) for b in GEMM_BACKENDS}
        if not resident:
            reasons["torchao"] = "needs the experts resident (--offload none)"
        chosen = next((b for b, why in reasons.items() if why is None), None)
        if chosen is None:
            log.warning("--fp8_gemm auto: no FP8 GEMM here (%s); the Linear layers stay exact", reasons["scaled_mm"])
        else:
            log.info("FP8 GEMMs: %s (auto)", chosen)
        return chosen
    why = gemm_unusable(name, device)
    if why is not None:
        raise ValueError(f"--fp8_gemm {name}: {why}; use --fp8_gemm auto (falls back to exact GEMMs) or leave it off")
    log.info("FP8 GEMMs: %s (forced)", name)
    return name


def convert_gemms(block: nn.Module, backend: str, index: int, count: int, policy: GemmPolicy = DEFAULT_POLICY) -> int:
    """Make the Linears of block ``index`` (of ``count``) that ``policy`` selects compute in FP8; returns how many."""
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and policy.selects(index, count, n)]
    if not names:
        return 0
    if backend == "torchao":
        ao = _torchao()
        # set_inductor_config=False: torchao would otherwise retune inductor globally (and compile every row slower).
        config = ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow(), set_inductor_config=False)
        selected = set(names)
        ao.quantize_(block, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in selected)
        return len(names)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, FP8Linear.from_linear(block.get_submodule(name), use_scaled_mm=True))
    return len(names)
