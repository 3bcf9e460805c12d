"""The one attention entry point: attention(q, k, v) on [B, L, H, D], backend chosen once."""

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


def _why_unusable(backend: Backend, device: torch.device) -> str | None:
    if backend.needs_cuda and device.type != "cuda":
        return "needs a CUDA device"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if not backend.min_capability <= cap <= backend.max_capability:
            return f"not used on compute capability {cap[0]}.{cap[1]}"
    try:
        backend.load()
    except Exception as exc:  # ImportError, or a broken build
        return f"not installed ({type(exc).__name__}: {exc})"
    return None


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Each backend -> None when usable on `device`, else why not."""
    device = torch.device(device)
    return {name: _why_unusable(b, device) for name, b in BACKENDS.items()}


_state: dict[str, object] = {"name": "sdpa", "fn": _sdpa}


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


@torch.library.custom_op("bernini::flash_attention", mutates_args=())
def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # An opaque op: torch.compile keeps the block in one graph around a kernel it cannot trace.
    return _state["fn"](q, k, v).contiguous()  # type: ignore[operator]


@_kernel.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    if _state["name"] == "sdpa" or q.device.type != "cuda" or q.dtype == torch.float32:
        return _sdpa(q, k, v)  # the flash kernels take CUDA half types only; the rest goes to SDPA
    return _kernel(q, k, v)
