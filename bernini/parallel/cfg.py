"""CFG parallelism: the guidance combos of a step are spread over cfg groups and all-gathered."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from bernini.guidance import Combo
from bernini.parallel.groups import all_gather_into, balance
from bernini.sampling import LocalCombos

log = logging.getLogger(__name__)


def assign_combos(work: list[tuple[Combo, int]], groups: int) -> list[list[Combo]]:
    """Combos of each cfg group, longest sequence first onto the least-loaded group.

    work: (combo, sequence length) in the Denoiser's order; the result is identical on every
    rank because it depends on nothing else. Each group's list keeps the work order.
    """
    placement = balance([float(length) for _, length in work], groups)
    return [[combo for (combo, _), g in zip(work, placement) if g == group] for group in range(groups)]


class CfgCombos(LocalCombos):
    """The Denoiser's combo placement over CFG peers (same data-parallel group and Ulysses index).

    With one cfg group it is LocalCombos: every combo is computed here and nothing is exchanged.
    """

    def __init__(self, size: int, index: int, group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype):
        if size > 1 and group is None:
            raise ValueError(f"CFG parallel of {size} groups needs a process group of the CFG peers")
        self.size = size
        self.index = index
        self.group = group
        self.device = device
        self.dtype = dtype
        self.table: list[list[Combo]] = []

    def select(self, work: list[tuple[Combo, int]]) -> set[Combo]:
        """The combos this rank's cfg group computes this step."""
        self.table = assign_combos(work, self.size)
        return set(self.table[self.index])

    def exchange(self, preds: dict[Combo, torch.Tensor], combos: tuple[Combo, ...]) -> dict[Combo, torch.Tensor]:
        """preds: this group's {combo: [1, L_t, F]} -> every combo's prediction, on every peer."""
        if self.size == 1:
            return preds
        mine = self.table[self.index]
        count = max(len(names) for names in self.table)
        shape = self._shape(preds)
        send = torch.zeros(count, *shape, dtype=self.dtype, device=self.device)  # short lists are zero-padded
        for slot, combo in enumerate(mine):
            send[slot] = preds[combo][0]
        recv = send.new_empty(self.size * count, *shape)
        all_gather_into(recv, send, group=self.group)
        recv = recv.unflatten(0, (self.size, count))
        every = {combo: recv[g, slot].unsqueeze(0) for g, names in enumerate(self.table) for slot, combo in enumerate(names)}
        missing = [str(c) for c in combos if c not in every]
        if missing:
            raise RuntimeError(f"CFG exchange lost combo(s) {', '.join(missing)}; select() must see every combo of the step")
        return every

    def _shape(self, preds: dict[Combo, torch.Tensor]) -> tuple[int, int]:
        """(L_t, F) of the predictions; a group with no combo this step learns it from its peers."""
        if all(self.table):
            return tuple(next(iter(preds.values())).shape[1:])  # type: ignore[return-value]
        # Only when cfg groups outnumber the combos: one tiny extra gather, the same on every peer.
        mine = torch.tensor(next(iter(preds.values())).shape[1:] if preds else (0, 0), device=self.device)
        every = mine.new_empty(self.size, 2)
        all_gather_into(every, mine.unsqueeze(0), group=self.group)
        length, features = every.max(dim=0).values.tolist()
        return int(length), int(features)
