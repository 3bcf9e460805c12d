"""The one attention entry point: attention(q, k, v) on [B, L, H, D], backends chosen once.

Two choices, both made at start-up and logged: the exact backend (--attention) and, opt-in and lossy,
an 8-bit backend for self-attention (--fp8_attention). Cross-attention to the text always stays exact.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]; torch picks cuDNN/flash/efficient/math by itself.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _first(result: torch.Tensor | tuple) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _fa3() -> AttentionFn:
    fn = importlib.import_module("flash_attn_interface").flash_attn_func
    return lambda q, k, v: _first(fn(q, k, v))


def _fa4() -> AttentionFn:
    fn = importlib.import_module("flash_attn.cute").flash_attn_func
    return lambda q, k, v: _first(fn(q, k, v))


def _fa2() -> AttentionFn:
    fn = importlib.import_module("flash_attn").flash_attn_func
    return lambda q, k, v: fn(q, k, v)


def _cudnn_fp8() -> AttentionFn:
    from bernini import cudnn_attention

    cudnn_attention.cudnn()  # ImportError here when nvidia-cudnn-frontend is missing
    return cudnn_attention.fp8_attention


def _sage() -> AttentionFn:
    fn = importlib.import_module("sageattention").sageattn
    # K is smoothed here, not by sageattn (which subtracts K's mean in place); softmax is invariant to the shift.
    return lambda q, k, v: fn(q, k - k.mean(dim=1, keepdim=True), v, tensor_layout="NHD", is_causal=False, smooth_k=False)


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], AttentionFn]
    needs_cuda: bool
    min_capability: tuple[int, int] = (0, 0)
    max_capability: tuple[int, int] = (99, 99)


# Order = preference for "auto". FA2 is skipped on Hopper: torch's cuDNN SDPA is 1.6x faster there.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa3", _fa3, needs_cuda=True, min_capability=(9, 0), max_capability=(9, 0)),
        Backend("fa4", _fa4, needs_cuda=True, min_capability=(9, 0)),
        Backend("fa2", _fa2, needs_cuda=True, min_capability=(8, 0), max_capability=(8, 9)),
        Backend("sdpa", lambda: _sdpa, needs_cuda=False),
    )
}


# Lossy, opt-in (--fp8_attention), self-attention only. Order = preference for "auto".
# cudnn_fp8: e4m3 Q/K/V/P, float32 softmax and accumulation. sage: SageAttention 1 (Triton): int8 Q/K per block,
# fp16 P and V with fp16 sums inside each 64-key block, float32 across blocks.
FP8_BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cudnn_fp8", _cudnn_fp8, needs_cuda=True, min_capability=(9, 0)),
        Backend("sage", _sage, needs_cuda=True, min_capability=(8, 0)),
    )
}
PROBE_MAX_ERROR = 0.2  # relative L2 against float32 SDPA on a small random input: a sanity bound, not a quality claim


def _probe(fn: AttentionFn, device: torch.device) -> None:
    """Run a lossy kernel once at an odd length (as the real ones are); raise if it fails or disagrees with SDPA."""
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 333, 2, 128, generator=g, device=device).to(torch.bfloat16) for _ in range(3))
    exact = _sdpa(q.float(), k.float(), v.float())
    error = float((fn(q, k, v).float() - exact).norm() / exact.norm())
    if not error < PROBE_MAX_ERROR:
        raise RuntimeError(f"disagrees with SDPA by {error:.3g} (relative L2) on a test input")


def _why_unusable(backend: Backend, device: torch.device, probe: bool = False) -> str | None:
    if backend.needs_cuda and device.type != "cuda":
        return "needs a CUDA device"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if not backend.min_capability <= cap <= backend.max_capability:
            return f"not used on compute capability {cap[0]}.{cap[1]}"
    try:
        fn = backend.load()
    except Exception as exc:  # ImportError, or a broken build
        return f"not installed ({type(exc).__name__}: {exc})"
    if probe:
        try:
            _probe(fn, device)
        except Exception as exc:  # an unsupported shape or card, a build for another toolkit
            return f"fails its check ({type(exc).__name__}: {exc})"
    return None


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Each backend -> None when usable on `device`, else why not."""
    device = torch.device(device)
    return {name: _why_unusable(b, device) for name, b in BACKENDS.items()}


def available_fp8_backends(device: torch.device | str) -> dict[str, str | None]:
    """Each --fp8_attention backend -> None when usable on `device` (it ran a check), else why not."""
    device = torch.device(device)
    return {name: _why_unusable(b, device, probe=True) for name, b in FP8_BACKENDS.items()}


_state: dict[str, object] = {"name": "sdpa", "fn": _sdpa, "fp8_name": None, "fp8_fn": None}


def select_backend(name: str, device: torch.device | str) -> str:
    """Choose the backend once ('auto' = best usable); returns its name and logs it."""
    device = torch.device(device)
    if name == "auto":
        reasons = available_backends(device)
        chosen = next(n for n, why in reasons.items() if why is None)
        skipped = {n: why for n, why in reasons.items() if why is not None and n != chosen}
        log.info("attention backend: %s (auto; skipped: %s)", chosen, skipped or "none")
    else:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
        backend = BACKENDS[name]
        if backend.needs_cuda and device.type != "cuda":
            raise ValueError(f"attention backend {name!r} needs a CUDA device; use --attention sdpa or auto")
        try:
            backend.load()
        except Exception as exc:
            raise ValueError(f"attention backend {name!r} is not installed ({exc}); use --attention auto") from exc
        chosen = name
        log.info("attention backend: %s (forced)", chosen)
    _state["name"] = chosen
    _state["fn"] = BACKENDS[chosen].load()
    return chosen


def current_backend() -> str:
    return str(_state["name"])


def select_fp8_attention(name: str, device: torch.device | str) -> str | None:
    """Choose --fp8_attention once: None = exact. 'auto' falls back to exact with a warning; a named backend must work."""
    device = torch.device(device)
    chosen: str | None
    if name == "off":
        chosen = None
    elif name == "auto":
        reasons = available_fp8_backends(device)
        chosen = next((n for n, why in reasons.items() if why is None), None)
        if chosen is None:
            log.warning("--fp8_attention auto: no 8-bit attention here (%s); self-attention stays exact", reasons)
        else:
            log.info("FP8 self-attention: %s (auto; skipped: %s)", chosen, {n: w for n, w in reasons.items() if w and n != chosen} or "none")
    elif name not in FP8_BACKENDS:
        raise ValueError(f"unknown --fp8_attention {name!r}; choose one of: off, auto, {', '.join(FP8_BACKENDS)}")
    else:
        why = _why_unusable(FP8_BACKENDS[name], device, probe=True)
        if why is not None:
            raise ValueError(f"--fp8_attention {name}: {why}; use --fp8_attention auto (falls back to exact attention) or leave it off")
        chosen = name
        log.info("FP8 self-attention: %s (forced)", chosen)
    _state["fp8_name"] = chosen
    _state["fp8_fn"] = None if chosen is None else FP8_BACKENDS[chosen].load()
    return chosen


def current_fp8_backend() -> str | None:
    return _state["fp8_name"]  # type: ignore[return-value]


def _opaque_op(name: str, kernel_key: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel under ``_state[kernel_key]`` as an opaque op: torch.compile keeps the block in one graph
    around a kernel it cannot trace (the exact and the FP8 backend each get one)."""

    @torch.library.custom_op(f"bernini::{name}", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _state[kernel_key](q, k, v).contiguous()  # type: ignore[operator]

    @op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    return op


_kernel = _opaque_op("flash_attention", "fn")
_fp8_kernel = _opaque_op("fp8_attention", "fp8_fn")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow_fp8: bool = True) -> torch.Tensor:
    """Full bidirectional attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D].

    ``allow_fp8``: whether the --fp8_attention backend (when one is chosen) may serve this call.
    """
    if allow_fp8 and _state["fp8_name"] is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _fp8_kernel(q, k, v)
    if _state["name"] == "sdpa" or q.device.type != "cuda" or q.dtype == torch.float32:
        return _sdpa(q, k, v)  # the flash kernels take CUDA half types only; the rest goes to SDPA
    return _kernel(q, k, v)
