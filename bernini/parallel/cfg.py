"""CFG parallelism: the guidance passes of a step are spread over cfg groups and all-gathered."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from bernini.guidance import GuidancePass
from bernini.parallel.groups import all_gather_into, balance
from bernini.sampling import LocalPasses

log = logging.getLogger(__name__)


def assign_passes(work: list[tuple[GuidancePass, int]], groups: int) -> list[list[GuidancePass]]:
    """Passes of each cfg group, longest sequence first onto the least-loaded group.

    work: (pass, sequence length) in the Denoiser's order; the result is identical on every
    rank because it depends on nothing else. Each group's list keeps the work order.
    """
    placement = balance([float(length) for _, length in work], groups)
    return [[pass_ for (pass_, _), g in zip(work, placement) if g == group] for group in range(groups)]


class CfgPasses(LocalPasses):
    """The Denoiser's pass placement over CFG peers (same data-parallel group and Ulysses index).

    With one cfg group it is LocalPasses: every pass is computed here and nothing is exchanged.
    """

    def __init__(self, size: int, index: int, group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype):
        if size > 1 and group is None:
            raise ValueError(f"CFG parallel of {size} groups needs a process group of the CFG peers")
        self.size = size
        self.index = index
        self.group = group
        self.device = device
        self.dtype = dtype
        self.table: list[list[GuidancePass]] = []

    def select(self, work: list[tuple[GuidancePass, int]]) -> set[GuidancePass]:
        """The passes this rank's cfg group computes this step."""
        self.table = assign_passes(work, self.size)
        return set(self.table[self.index])

    def exchange(self, preds: dict[GuidancePass, torch.Tensor], passes: tuple[GuidancePass, ...]) -> dict[GuidancePass, torch.Tensor]:
        """preds: this group's {pass: [1, L_t, F]} -> every pass's prediction, on every peer."""
        if self.size == 1:
            return preds
        mine = self.table[self.index]
        count = max(len(names) for names in self.table)
        shape = self._shape(preds)
        send = torch.zeros(count, *shape, dtype=self.dtype, device=self.device)  # short lists are zero-padded
        for slot, pass_ in enumerate(mine):
            send[slot] = preds[pass_][0]
        recv = send.new_empty(self.size * count, *shape)
        all_gather_into(recv, send, group=self.group)
        recv = recv.unflatten(0, (self.size, count))
        every = {pass_: recv[g, slot].unsqueeze(0) for g, names in enumerate(self.table) for slot, pass_ in enumerate(names)}
        missing = [str(c) for c in passes if c not in every]
        if missing:
            raise RuntimeError(f"CFG exchange lost pass(s) {', '.join(missing)}; select() must see every pass of the step")
        return every

    def _shape(self, preds: dict[GuidancePass, torch.Tensor]) -> tuple[int, int]:
        """(L_t, F) of the predictions; a group with no pass this step learns it from its peers."""
        if all(self.table):
            return tuple(next(iter(preds.values())).shape[1:])  # type: ignore[return-value]
        # Only when cfg groups outnumber the passes: one tiny extra gather, the same on every peer.
        mine = torch.tensor(next(iter(preds.values())).shape[1:] if preds else (0, 0), device=self.device)
        every = mine.new_empty(self.size, 2)
        all_gather_into(every, mine.unsqueeze(0), group=self.group)
        length, features = every.max(dim=0).values.tolist()
        return int(length), int(features)
