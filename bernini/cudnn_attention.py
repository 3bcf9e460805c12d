"""cuDNN's FP8 attention (the sdpa_fp8 graph of nvidia-cudnn-frontend) on [B, L, H, D] bf16 tensors, one graph per shape.

Q, K and V are quantized per tensor to e4m3 with dynamic scales (amax / 448); cuDNN computes the softmax and
both products' accumulation in float32 and stores the probabilities as e4m3 for the P @ V product. The output
is bf16 where cuDNN offers it, else e4m3 scaled to V's range and dequantized here. Library glue, no kernel:
torch's own SDPA has no FP8 path, so the graph is built through the frontend's Python API.
"""

from __future__ import annotations

import functools
import importlib
import threading
from enum import IntEnum
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
P_SCALE = 256.0  # probabilities (<= 1) are stored as p * 256: a power of two keeps the descale exact, 448 bounds it


class Uid(IntEnum):
    Q, K, V, O = 1, 2, 3, 4
    DESCALE_Q, DESCALE_K, DESCALE_V, DESCALE_S, SCALE_S, SCALE_O, AMAX_O = 10, 11, 12, 13, 14, 15, 16


@functools.cache
def cudnn() -> Any:
    """The frontend module; ImportError when nvidia-cudnn-frontend is not installed."""
    return importlib.import_module("cudnn")


def bshd(b: int, h: int, length: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's (B, H, L, D) dims over memory laid out as [B, L, H, D]."""
    return (b, h, length, d), (length * h * d, d, h * d, 1)


class Plan:
    """A built sdpa_fp8 graph for one shape, with its handle and workspace size."""

    def __init__(self, b: int, h: int, lq: int, lk: int, d: int, device: torch.device, bf16_out: bool):
        lib = cudnn()
        self.bf16_out = bf16_out
        with torch.cuda.device(device):
            self.handle = lib.create_handle()  # bound to the current device: the graph is built and run on it
        self.graph = lib.pygraph(
            io_data_type=lib.data_type.FP8_E4M3, intermediate_data_type=lib.data_type.FLOAT, compute_data_type=lib.data_type.FLOAT, handle=self.handle
        )
        g = self.graph
        tensors = {}
        for uid, length in ((Uid.Q, lq), (Uid.K, lk), (Uid.V, lk)):
            dim, stride = bshd(b, h, length, d)
            tensors[uid] = g.tensor(uid=int(uid), dim=dim, stride=stride, data_type=lib.data_type.FP8_E4M3)
        for uid in (Uid.DESCALE_Q, Uid.DESCALE_K, Uid.DESCALE_V, Uid.DESCALE_S, Uid.SCALE_S, Uid.SCALE_O):
            tensors[uid] = g.tensor(uid=int(uid), dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=lib.data_type.FLOAT)
        o, _stats, _amax_s, amax_o = g.sdpa_fp8(
            q=tensors[Uid.Q], k=tensors[Uid.K], v=tensors[Uid.V],
            descale_q=tensors[Uid.DESCALE_Q], descale_k=tensors[Uid.DESCALE_K], descale_v=tensors[Uid.DESCALE_V],
            descale_s=tensors[Uid.DESCALE_S], scale_s=tensors[Uid.SCALE_S], scale_o=tensors[Uid.SCALE_O],
            generate_stats=False, attn_scale=d**-0.5, use_causal_mask=False,
        )  # fmt: skip
        dim, stride = bshd(b, h, lq, d)
        o.set_uid(int(Uid.O)).set_output(True).set_dim(dim).set_stride(stride).set_data_type(lib.data_type.BFLOAT16 if bf16_out else lib.data_type.FP8_E4M3)
        amax_o.set_uid(int(Uid.AMAX_O)).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(lib.data_type.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([lib.heur_mode.A, lib.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.workspace_size = g.get_workspace_size()


_plans: dict[tuple, Plan] = {}
_lock = threading.Lock()


def plan_for(b: int, h: int, lq: int, lk: int, d: int, device: torch.device) -> Plan:
    """Built once per shape: bf16 output first, e4m3 output where this cuDNN lacks it."""
    key = (b, h, lq, lk, d, device)
    with _lock:
        if key not in _plans:
            try:
                _plans[key] = Plan(b, h, lq, lk, d, device, bf16_out=True)
            except Exception:  # cudnnGraphNotSupportedError, or a frontend that rejects the bf16 output type
                _plans[key] = Plan(b, h, lq, lk, d, device, bf16_out=False)
        return _plans[key]


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: (x * 448 / amax, contiguous [B, L, H, D]) and the float32 descale amax / 448 as [1, 1, 1, 1]."""
    amax = x.abs().amax().float().clamp_min(1e-12)
    x8 = (x.float() * (FP8_MAX / amax)).clamp_(-FP8_MAX, FP8_MAX).to(FP8).contiguous()  # e4m3fn has no inf
    return x8, (amax / FP8_MAX).reshape(1, 1, 1, 1)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] bf16/fp16 on a CUDA device -> [B, Lq, H, D] in q's dtype."""
    b, lq, h, d = q.shape
    plan = plan_for(b, h, lq, k.shape[1], d, q.device)
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    one = torch.ones(1, 1, 1, 1, device=q.device)
    scale_o = one if plan.bf16_out else 1.0 / dv  # e4m3 output: O is a convex mix of V's rows, so V's scale fits it
    out = torch.empty(b, lq, h, d, device=q.device, dtype=torch.bfloat16 if plan.bf16_out else FP8)
    pack = {
        Uid.Q: q8, Uid.K: k8, Uid.V: v8, Uid.O: out, Uid.AMAX_O: torch.empty_like(one),
        Uid.DESCALE_Q: dq, Uid.DESCALE_K: dk, Uid.DESCALE_V: dv,
        Uid.DESCALE_S: one / P_SCALE, Uid.SCALE_S: one * P_SCALE, Uid.SCALE_O: scale_o,
    }  # fmt: skip
    workspace = torch.empty(plan.workspace_size, device=q.device, dtype=torch.uint8)
    lib = cudnn()
    lib.set_stream(plan.handle, torch.cuda.current_stream(q.device).cuda_stream)
    plan.graph.execute({int(uid): t for uid, t in pack.items()}, workspace, handle=plan.handle)
    return (out if plan.bf16_out else out.float() * dv).to(q.dtype)
