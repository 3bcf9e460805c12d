"""Peak bytes of the tensors a call keeps alive, counted on meta tensors: an A14B forward's allocations, without a GPU.

Each op's new outputs are counted (rounded up to 512 bytes, as the CUDA caching allocator does) until the tensor's
storage is freed; views and in-place writes add nothing. The two kernels whose allocations differ on a GPU are
stood in for by what they allocate there: a flash attention kernel (its output and the row log-sum-exp) and the
FFN's GEMM with the GELU in its epilogue (its output only).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bernini.models import transformer


class LiveBytes(TorchDispatchMode):
    """Inside the block: ``live`` bytes of op outputs still referenced, ``peak`` the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen or id(storage) in inputs:  # a view, or an op writing into its input
                continue
            self._seen.add(storage)
            nbytes = -(-storage.nbytes() // 512) * 512
            self.live += nbytes
            weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow_fp8: bool = True) -> torch.Tensor:
    q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)  # the log-sum-exp rows, freed at once
    return torch.empty_like(q)


def _gelu_epilogue(x: torch.Tensor, linear: torch.nn.Module, fuse: bool = True) -> torch.Tensor:
    out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextmanager
def gpu_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The model's CUDA-only kernels stood in for on the meta device."""
    with monkeypatch.context() as patch:
        patch.setattr(transformer, "attention", _flash)
        patch.setattr(transformer, "linear_gelu", _gelu_epilogue)
        yield


def forward_peak(cfg: transformer.TransformerConfig, rows: int, batch: int, chunk_tokens: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Peak bytes of one bf16 forward over ``batch`` passes of ``rows // batch`` tokens, beyond its inputs and weights."""
    length = rows // batch
    with torch.device("meta"):
        model = transformer.WanTransformer(cfg, chunk_tokens=chunk_tokens).to(torch.bfloat16)
        transformer.fuse_projections(model)  # as the renderer runs it
        tokens = torch.empty(1, length, cfg.dim, dtype=torch.bfloat16)
        kv = [(torch.empty(batch, 512, cfg.num_attention_heads, cfg.attention_head_dim, dtype=torch.bfloat16),) * 2 for _ in range(cfg.num_layers)]
        cos = sin = torch.empty(length, cfg.attention_head_dim // 2)
        timestep = torch.full((batch,), 500.0)
    probe = LiveBytes()
    with gpu_kernels(monkeypatch), probe, torch.no_grad():
        model(tokens.expand(batch, -1, -1), timestep, kv, (cos, sin))
    return probe.peak

