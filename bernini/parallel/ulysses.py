"""Ulysses sequence parallelism: shard the packed sequence, all-to-all heads around attention."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bernini.attention import attention
from bernini.models import LocalSequence, apply_rope
from bernini.parallel.groups import all_gather_into


def padded_length(length: int, degree: int) -> int:
    """The smallest multiple of `degree` that holds `length` tokens."""
    return -(-length // degree) * degree


def pad_sequence(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad dim `dim` of x up to `length` (a no-op view when it already has that length)."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class UlyssesSequence(LocalSequence):
    """The sequence hooks over a Ulysses group of U ranks (only its ranks call them).

    Each rank keeps L_pad/U consecutive tokens between attentions; attention sees the whole
    sequence for H/U heads. Padding tokens never reach attention, so results match one device.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.degree = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self.length = 0  # true L of the current forward, set by shard

    @property
    def padded(self) -> int:
        return padded_length(self.length, self.degree)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] (identical on every rank) -> this rank's slice [B, L_pad/U, D]."""
        self.length = x.shape[1]
        chunk = self.padded // self.degree
        mine = pad_sequence(x, self.padded)[:, self.index * chunk : (self.index + 1) * chunk]
        # A fresh tensor, not a view: compiled blocks guard on strides (even of size-1 dims) and would recompile.
        return mine.clone(memory_format=torch.contiguous_format)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L_pad/U, F] per rank -> the whole sequence [B, L, F] on every rank."""
        out = x.new_empty(self.degree * x.shape[0], *x.shape[1:])
        all_gather_into(out, x.contiguous(), group=self.group)
        b = x.shape[0]
        return out.unflatten(0, (self.degree, b)).transpose(0, 1).flatten(1, 2)[:, : self.length]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L_pad/U, H, Dh]; cos, sin: [L, Dh/2] (whole sequence) -> [B, L_pad/U, H, Dh]."""
        qkv = self._heads_to_sequence(torch.stack((q, k, v)))[:, :, : self.length]
        out = attention(apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2])
        return self._sequence_to_heads(pad_sequence(out, self.padded))

    def _heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """One fused all-to-all: [3, B, L_pad/U, H, Dh] -> [3, B, L_pad, H/U, Dh]."""
        u = self.degree
        three, b, chunk, heads, dh = x.shape
        # Chunk j of dim 0 goes to rank j: head group j of this rank's tokens.
        send = x.reshape(three, b, chunk, u, heads // u, dh).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[j] holds sequence chunk j for this rank's heads.
        return recv.permute(1, 2, 0, 3, 4, 5).reshape(three, b, u * chunk, heads // u, dh)

    def _sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse all-to-all: [B, L_pad, H/U, Dh] -> [B, L_pad/U, H, Dh]."""
        u = self.degree
        b, length, local_heads, dh = x.shape
        send = x.reshape(b, u, length // u, local_heads, dh).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[j] holds head group j for this rank's tokens.
        return recv.permute(1, 2, 0, 3, 4).reshape(b, length // u, u * local_heads, dh)
