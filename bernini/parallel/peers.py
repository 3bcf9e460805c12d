"""The other ranks of a long-lived launch (the demo, the job server): rank 0 sends each request, all agree each step on stopping."""

from __future__ import annotations

from typing import Any, Protocol

import torch.distributed as dist

from bernini.parallel.groups import Groups


class Peers(Protocol):
    def send(self, job: Any) -> None: ...

    def receive(self) -> Any: ...

    def agree(self, stop: bool) -> bool: ...


class LocalPeers:
    """One process: nobody to tell."""

    def send(self, job: Any) -> None:
        pass

    def receive(self) -> Any:
        return None

    def agree(self, stop: bool) -> bool:
        return stop


class DistPeers:
    """Ranks of one model group: requests go out on the control group, the stop flag every step on the model group."""

    def __init__(self, groups: Groups) -> None:
        self.groups = groups

    def send(self, job: Any) -> None:
        dist.broadcast_object_list([job], src=0, group=self.groups.control)

    def receive(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.groups.control)
        return box[0]

    def agree(self, stop: bool) -> bool:
        # Every rank leaves the render at the same step, or the others would wait in a collective.
        flag = [stop]
        dist.broadcast_object_list(flag, src=0, group=self.groups.model)
        return bool(flag[0])
